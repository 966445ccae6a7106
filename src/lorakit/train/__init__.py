"""The one training loop (loop.py) and what it needs: settings (config.py), data files -> batches (data.py),
losses (loss.py), run set-up (setup.py), checkpoints (checkpoint.py), torchrun (distributed.py), the memory
check before a run (memory_check.py), plots (plot.py), grouped projections (projection_groups.py), the
rank probe behind `lorakit suggest-ranks` (rank_probe.py), and preference training (method: dpo | orpo):
pairs -> batches (preference_data.py), the DPO / ORPO losses (preference_loss.py).

    from lorakit.train import train, TrainConfig
    result = train(TrainConfig(data="my.jsonl", output_dir="runs/mine"))
"""

from .config import TrainConfig, load_train_config
from .loop import evaluate, train

__all__ = ["TrainConfig", "evaluate", "load_train_config", "train"]
