"""Client-side work: local training and evaluation (no strategy, no runtime)."""

from fedhet.client.train import (
    TrainPlan,
    UpdateResult,
    local_update,
    make_upload,
    run_instruction,
)

__all__ = ["TrainPlan", "UpdateResult", "local_update", "make_upload", "run_instruction"]
