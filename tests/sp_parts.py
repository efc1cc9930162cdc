"""Sequence parallelism on plain torch.distributed (gloo), no Ray: `measure` runs in each of 2 processes started by
tests/test_sequence_parallel.py, computes the same rows without and with SP=2 (DeepSpeed's Ulysses attention and
loader adapter, raysft's wiring in raysft/train/sequence_parallel.py), and rank 0 saves what the test compares."""

from __future__ import annotations

import os

# four packed rows: examples of these lengths (position ids restart at each), the last one padded
ROWS = [(40, 24), (30, 18, 16), (12, 30, 8), (26, 20)]
PAD = 6


def tiny_model(kv_heads: int = 1):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raysft import loss

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    loss.attach(model, "chunked")
    return model


def rows():
    """The collated packed rows: input ids, labels (the first token of each example untrained) and position ids."""
    import torch

    from raysft.modeling import collate

    g = torch.Generator().manual_seed(1)
    out = []
    for i, lengths in enumerate(ROWS):
        ids = torch.randint(3, 300, (sum(lengths),), generator=g).tolist()
        labels = list(ids)
        for start in [sum(lengths[:k]) for k in range(len(lengths))]:
            labels[start] = -100
        pos = [j for n in lengths for j in range(n)]
        batch = collate({"input_ids": [ids], "labels": [labels], "position_ids": [pos]}, pad_id=0,
                        multiple=PAD * 2 if i == len(ROWS) - 1 else 2)
        out.append(batch)
    return out


def grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def measure(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import torch
    import torch.distributed as dist

    from raysft.loss import loss_sum
    from raysft.train import sequence_parallel

    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = tiny_model()  # 4 heads, 1 key/value head: Ulysses replicates it on both ranks
    model.train()
    batches = rows()
    n_trained = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    result = {}

    # SP=1, one process: every row, the global batch's mean
    total = sum(loss_sum(model, b) for b in batches) / n_trained
    total.backward()
    result["loss_ref"], result["grads_ref"] = total.item(), grads(model)
    model.eval()
    with torch.no_grad():  # each example of the first row alone
        alone, start = [], 0
        for n in ROWS[0]:
            alone.append(model(input_ids=batches[0]["input_ids"][:, start:start + n], use_cache=False).logits)
            start += n
        result["logits_alone"] = torch.cat(alone, dim=1)
        whole = {k: batches[0][k] for k in ("input_ids", "position_ids")}
        result["logits_row"] = model(**whole, use_cache=False).logits  # the packed row, the model's own kernel

    # SP=2: rank r is scheduled rows r, r+2, ... (like a 2-worker run); the adapter gives each rank its slice of
    # both ranks' rows
    sp = sequence_parallel.setup(model, 2, micro_batch_size=1, device=torch.device("cpu"), pad_id=0)
    model.train()

    def sp_step(tag: str) -> None:
        model.zero_grad()
        slices = sp.shard([b for i, b in enumerate(batches) if i % world == rank])
        local = sum(loss_sum(model, s) for s in slices) / n_trained
        local.backward()
        loss = local.detach().clone()
        dist.all_reduce(loss)  # the ranks' parts of the global batch's loss
        g = grads(model)
        for v in g.values():
            dist.all_reduce(v)  # what DeepSpeed's gradient average x world gives
        result[f"loss_{tag}"], result[f"grads_{tag}"] = loss.item(), g
        result[f"slices_{tag}"] = len(slices)

    sp_step("sp")
    with torch.no_grad():  # the first row's logits, sliced over the group, gathered
        first = sp.shard([batches[0]] if rank == 0 else [batches[1]])[0]
        local = model(input_ids=first["input_ids"], position_ids=first["position_ids"], use_cache=False).logits
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous())
        result["logits_sp"] = torch.cat(parts, dim=1)[:, :sum(ROWS[0])]
    result["tiled"] = sequence_parallel.tile_mlp(model, shards=3)  # slices of 24-32 tokens: uneven tiles
    tiles = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, o: tiles.append(a[0].shape[-2]))
    sp_step("sp_tiled")
    hook.remove()
    result["tiles"] = tiles
    sequence_parallel.offload_activations(model)  # gradient checkpointing, the layers' inputs kept in CPU memory
    packed = []

    class Counted(torch.autograd.graph.save_on_cpu):  # torch's save_on_cpu, noting the shape of each tensor it moves
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pack = self.pack_hook
            self.pack_hook = lambda t: packed.append(tuple(t.shape)) or pack(t)

    torch.autograd.graph.save_on_cpu = Counted
    calls = []
    for layer in model.model.layers:  # count the checkpointed calls
        inner = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _inner=inner, **k: calls.append(1) or _inner(*a, **k)
    sp_step("sp_tiled_offload")
    result["checkpoint_calls"], result["offloaded"] = len(calls), packed
    model.eval()
    with torch.no_grad():  # after SP training steps: eval sees the model's own kernel, with its own head groups
        result["logits_row_after"] = model(**whole, use_cache=False).logits
    if rank == 0:
        torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()
