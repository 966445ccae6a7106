"""Loss plots: a run's loss.png (train and eval loss against step) and one PNG comparing runs."""

from __future__ import annotations

from ..utils import atomic_path


def _pyplot():
    # matplotlib takes ~0.9 s to import: only the end of a run (or a comparison plot) pays for it
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; must precede the pyplot import
    import matplotlib.pyplot as plt  # after matplotlib.use (see above)

    return plt


def _save_png(fig, path: str) -> None:
    """Lay out, write atomically (temp file, then rename) and free the figure."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    _pyplot().close(fig)


def _plot_metric(ax, history: list[dict], train_key: str, eval_key: str, ylabel: str) -> None:
    """Train values (train_key) as a line, held-out values (eval_key) as markers, against step."""
    trains = [r for r in history if train_key in r]
    ax.plot([r["step"] for r in trains], [r[train_key] for r in trains], label="train")
    evals = [r for r in history if eval_key in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r[eval_key] for r in evals], "o-", label="eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()


def plot_losses(history: list[dict], path: str) -> None:
    """loss.png: train and eval loss; for a preference run (dpo/orpo) also the reward margin and accuracy; for a
    grpo run the reward (sampled rollouts, and greedy on the held-out prompts) beside the loss."""
    if any("reward_std" in r for r in history):
        fig, axes = _pyplot().subplots(1, 2, figsize=(12, 4), squeeze=False)
        _plot_metric(axes[0][0], history, "reward", "eval_reward", "reward (sum over reward functions)")
        _plot_metric(axes[0][1], history, "train_loss", "eval_loss", "GRPO loss")
        _save_png(fig, path)
        return
    preference = any("rewards/margins" in r for r in history)
    fig, axes = _pyplot().subplots(1, 3 if preference else 1, figsize=(15 if preference else 7, 4), squeeze=False)
    _plot_metric(axes[0][0], history, "train_loss", "eval_loss",
                 "loss (nats / pair)" if preference else "loss (nats / token)")
    if preference:
        for ax, name, label in ((axes[0][1], "rewards/margins", "reward margin (chosen - rejected)"),
                                (axes[0][2], "rewards/accuracies", "reward accuracy (chosen > rejected)")):
            _plot_metric(ax, history, name, f"eval_{name}", label)
    _save_png(fig, path)


def plot_curves(histories: dict[str, list[dict]], path: str, title: str = "") -> None:
    """One PNG comparing runs: train loss (lines) and held-out loss (markers), one colour per run."""
    fig, (ax_train, ax_eval) = _pyplot().subplots(1, 2, figsize=(11, 4), sharey=True)
    for i, (name, history) in enumerate(histories.items()):
        colour = f"C{i}"
        trains = [r for r in history if "train_loss" in r]
        evals = [r for r in history if "eval_loss" in r]
        ax_train.plot([r["step"] for r in trains], [r["train_loss"] for r in trains], color=colour, label=name)
        ax_eval.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color=colour, label=name)
    for ax, what in ((ax_train, "train loss"), (ax_eval, "held-out loss")):
        ax.set_xlabel("optimizer step")
        ax.set_title(what)
        ax.grid(alpha=0.3)
    ax_train.set_ylabel("loss (nats / token)")
    ax_eval.legend()
    if title:
        fig.suptitle(title)
    _save_png(fig, path)
