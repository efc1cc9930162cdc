"""The data stage: records -> ChatML -> tokens with loss mask -> packed rows.

Public API: `to_chatml(record) -> {"prompt", "completion", "text"}` and `RecordError`.
"""

from raysft.data.chatml import to_chatml
from raysft.data.records import RecordError

__all__ = ["to_chatml", "RecordError"]
