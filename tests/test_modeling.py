"""Packing keeps examples apart: logits and loss of a packed row equal those of its examples alone."""

import pytest
import torch

from raysft.data.packing import make_rows
from raysft.loss import token_loss_sum
from raysft.modeling import attention_available, build_model, collate
from raysft.train.schedule import BatchShape, Schedule


def examples(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = 5 + 7 * i
        ids = torch.randint(3, 300, (k,), generator=g).tolist()
        labels = [-100] * 3 + ids[3:]
        out.append((ids, labels))
    return out


def as_rows(rows_obj):
    return {"input_ids": rows_obj.input_ids, "labels": rows_obj.labels, "position_ids": rows_obj.position_ids}


@pytest.mark.parametrize("attn", attention_available(torch.cuda.is_available()))  # flash ones on CUDA
def test_packed_row_logits_equal_each_example_alone(tiny_model_dir, attn):
    flash = attn.startswith("flash")  # CUDA only, and half precision only
    device, dtype, tol = ("cuda", "bf16", 2e-2) if flash else ("cpu", "fp32", 1e-5)
    model = build_model(tiny_model_dir, 386, from_scratch=True, seed=0, attn_implementation=attn,
                        dtype=dtype).eval().to(device)
    exs = examples()
    packed = collate(as_rows(make_rows(exs, 128, packing=True)), pad_id=0, device=device)
    assert packed["input_ids"].shape[0] == 1  # all four share one row
    with torch.no_grad():
        # no use_cache=False here: build_model must have turned the KV cache off (else the packed mask is skipped)
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0].float()
        start = 0
        row = make_rows(exs, 128, packing=True)
        for n in row.seq_lengths[0]:
            ids = torch.tensor([row.input_ids[0][start:start + n]], device=device)
            alone = model(input_ids=ids, use_cache=False).logits[0].float()
            torch.testing.assert_close(logits[start:start + n], alone, atol=tol, rtol=tol)
            start += n


def test_packed_loss_equals_unpadded_loss_on_the_same_examples(tiny_model_dir):
    model = build_model(tiny_model_dir, 386, from_scratch=True, seed=0).eval()
    exs = examples(6)
    n_trained = sum(sum(1 for x in lab[1:] if x != -100) for _, lab in exs)
    with torch.no_grad():
        packed = collate(as_rows(make_rows(exs, 64, packing=True)), pad_id=0)
        loss_packed = token_loss_sum(model(input_ids=packed["input_ids"],
                                           position_ids=packed["position_ids"], use_cache=False).logits, packed["labels"]) / n_trained
        padded = collate(as_rows(make_rows(exs, 64, packing=False)), pad_id=0)
        loss_padded = token_loss_sum(model(input_ids=padded["input_ids"],
                                           position_ids=padded["position_ids"], use_cache=False).logits, padded["labels"]) / n_trained
        one_by_one = sum(token_loss_sum(model(input_ids=torch.tensor([ids]), use_cache=False).logits, torch.tensor([lab]))
                         for ids, lab in exs) / n_trained
        # the flash kernels' layout (modeling.flatten): the 6 padded rows end to end as one row
        flat = collate(as_rows(make_rows(exs, 64, packing=False)), pad_id=0, flat=True)
        loss_flat = token_loss_sum(model(input_ids=flat["input_ids"], position_ids=flat["position_ids"],
                                         use_cache=False).logits, flat["labels"]) / n_trained
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0] == 6
    assert flat["input_ids"].shape == (1, padded["input_ids"].numel())
    assert torch.equal(flat["labels"][0], padded["labels"].flatten())
    torch.testing.assert_close(loss_packed, one_by_one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_padded, one_by_one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_flat, one_by_one, atol=1e-5, rtol=1e-5)


def test_row_ids_seen_are_the_same_with_1_and_2_workers():
    s = Schedule(num_rows=103, global_batch_size=8, seed=3, epochs=3)
    seen = {}
    for world in (1, 2, 4):
        micro = 8 // world // 2 or 1
        seen[world] = [r for step in range(s.total_steps) for rank in range(world)
                       for mb in s.rank_micro_batches(step, rank, BatchShape(8, micro, world)) for r in mb]
    assert seen[1] == seen[2] == seen[4]
    assert len(seen[1]) == 3 * (103 // 8) * 8
    first_epoch = seen[1][: 12 * 8]
    assert len(set(first_epoch)) == len(first_epoch)  # no row twice within an epoch
    assert seen[1][:96] != seen[1][96:192]  # reshuffled each epoch
    assert Schedule(103, 8, seed=4, epochs=3).global_batch(0) != s.global_batch(0)  # the seed matters
