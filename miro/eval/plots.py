"""PNG figures for evaluation reports (matplotlib, Agg back-end, no display needed)."""

from __future__ import annotations

from pathlib import Path

from miro.io import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # file output only; never opens a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")  # the temp name has no .png suffix
    _plt().close(fig)
    return path


def plot_categories(tags: dict[str, float], path, title: str = "GenEval-like", paper: dict[str, float] | None = None,
                    paper_label: str = "paper") -> Path:
    """Bar chart of per-category accuracy in percent; optional paper bars beside ours."""
    plt = _plt()
    names = list(tags)
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(names)), 3.2))
    x = range(len(names))
    width = 0.4 if paper else 0.7
    ax.bar([i - (width / 2 if paper else 0) for i in x], [100 * tags[n] for n in names], width, label="this run")
    if paper:
        ax.bar([i + width / 2 for i in x], [paper.get(n, 0.0) for n in names], width, label=paper_label, alpha=0.7)
        ax.legend(fontsize=8)
    ax.set_xticks(list(x), [n.replace("_", " ") for n in names], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    return _save(fig, path)


def plot_best_of_n(curve: dict, path, paper: dict[str, dict[int, float]] | None = None) -> Path:
    """Score vs N (log2 axis) for each reported reward; optional paper points per row."""
    plt = _plt()
    keys = list(curve["values"])
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 3.0), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ax.plot(curve["n"], curve["values"][k], "o-", label="this run")
        if paper and k in paper:
            for row, pts in paper[k].items():
                ax.plot(list(pts), list(pts.values()), "s--", alpha=0.6, label=f"paper {row}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (candidates)")
        ax.set_title(k, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"best-of-N, selected by {curve['select_by']} ({curve['mode']})", fontsize=9)
    return _save(fig, path)


def plot_sweep(sweep: dict, path) -> Path:
    """Mean score (± std) vs the swept reward's target, one panel per scorer."""
    plt = _plt()
    names = sorted(sweep["spearman_means"])
    has_ge = "spearman_geneval" in sweep
    panels = len(names) + int(has_ge)
    fig, axes = plt.subplots(1, panels, figsize=(3.4 * panels, 3.0), squeeze=False)
    t = sweep["targets"]
    for ax, n in zip(axes[0], names):
        m = [r[n]["mean"] for r in sweep["per_target"]]
        s = [r[n]["std"] for r in sweep["per_target"]]
        ax.errorbar(t, m, yerr=s, fmt="o-", capsize=2)
        ax.set_xlabel(f"{sweep['swept']} target")
        ax.set_title(f"{n}  (rho={sweep['spearman_means'][n]:.2f})", fontsize=9)
    if has_ge:
        ax = axes[0][-1]
        ax.plot(t, [100 * r["geneval_overall"] for r in sweep["per_target"]], "o-")
        ax.set_xlabel(f"{sweep['swept']} target")
        ax.set_title(f"GenEval-style overall %  (rho={sweep['spearman_geneval']:.2f})", fontsize=9)
    return _save(fig, path)


def plot_reward_hist(summary_records: dict[str, list[float]], path) -> Path:
    """Histogram of each reward's raw scores."""
    plt = _plt()
    names = list(summary_records)
    fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 2.6), squeeze=False)
    for ax, n in zip(axes[0], names):
        ax.hist(summary_records[n], bins=20)
        ax.set_title(n, fontsize=9)
    return _save(fig, path)


def placeholder_cell(cell: int):
    """The grid cell standing for an unreadable image: light grey with a dark cross, so it reads as
    missing rather than as a generated grey picture."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (cell, cell), "#dddddd")
    draw = ImageDraw.Draw(im)
    draw.line((0, 0, cell - 1, cell - 1), fill="#888888", width=max(1, cell // 32))
    draw.line((0, cell - 1, cell - 1, 0), fill="#888888", width=max(1, cell // 32))
    return im


def grid_cell(path: Path, cell: int, skipped: list | None = None):
    """``path`` resized to ``cell`` (nearest when enlarging: small images stay crisp), or the
    placeholder when it cannot be read (appended to ``skipped``): one truncated PNG must not stop a
    report, as it stops no scoring step."""
    from PIL import Image

    from miro.eval.folder import load_rgb

    im = load_rgb(path)
    if im is None:
        if skipped is not None:
            skipped.append(path)
        return placeholder_cell(cell)
    return im.resize((cell, cell), Image.NEAREST if im.width <= cell else Image.BICUBIC)


def image_grid(paths: list[Path | None], ncols: int, cell: int = 128, gap: int = 2, skipped: list | None = None):
    """A PIL grid of images, each resized to ``cell``, ``gap`` white pixels apart; an unreadable
    image is a placeholder cell and its path is appended to ``skipped``; None leaves its cell
    blank (a short row)."""
    from PIL import Image

    if not paths:
        raise ValueError("no images for the grid")
    rows = (len(paths) + ncols - 1) // ncols
    step = cell + gap
    grid = Image.new("RGB", (ncols * step - gap, rows * step - gap), "white")
    for k, p in enumerate(paths):
        if p is not None:
            grid.paste(grid_cell(p, cell, skipped), ((k % ncols) * step, (k // ncols) * step))
    return grid
