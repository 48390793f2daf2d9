"""Moved to `embedder.data.kinds` (`TaskSettings` is now `RecordKind`; `build_task_settings` is
`embedder.record_kinds.build_record_kinds`). This name keeps working for one release, with a warning."""

from __future__ import annotations

import warnings

from embedder.data.kinds import Instruction, LossSpec, RecordKind, TaskSettings, export_prompts  # noqa: F401

warnings.warn("embedder.data.tasks moved to embedder.data.kinds (TaskSettings -> RecordKind); the old name goes in "
              "0.3", DeprecationWarning, stacklevel=2)
