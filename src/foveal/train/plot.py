"""Loss-curve PNG: matplotlib when installed, else a plain line chart drawn with Pillow."""

from __future__ import annotations

from pathlib import Path


def smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(steps: list[int], losses: list[float], path: Path, title: str = "training loss") -> Path:
    path = Path(path)
    window = max(1, len(losses) // 50)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pillow(steps, losses, smooth(losses, window), path, title)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, color="#9ecae1", linewidth=1, label="loss")
    if window > 1:
        ax.plot(steps, smooth(losses, window), color="#08519c", linewidth=2, label=f"mean of {window}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_pillow(steps, losses, smoothed, path: Path, title: str) -> Path:
    from PIL import Image, ImageDraw
    W, H, L, R, T, B = 700, 400, 60, 20, 30, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    if not losses:
        d.text((W // 2 - 40, H // 2), "no steps", fill="black")
        img.save(path)
        return path
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1.0
    x0, x1 = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1

    def xy(s, v):
        return L + (s - x0) / (x1 - x0) * (W - L - R), T + (hi - v) / (hi - lo) * (H - T - B)

    d.rectangle([L, T, W - R, H - B], outline="#888888")
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        y = xy(x0, v)[1]
        d.line([L, y, W - R, y], fill="#eeeeee")
        d.text((5, y - 6), f"{v:.3g}", fill="black")
    d.text((L, H - B + 10), str(x0), fill="black")
    d.text((W - R - 40, H - B + 10), str(x1), fill="black")
    d.text((L, 8), f"{title} (x: optimizer step)", fill="black")
    for series, colour, width in ((losses, "#9ecae1", 1), (smoothed, "#08519c", 2)):
        pts = [xy(s, v) for s, v in zip(steps, series)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=width)
        else:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
    img.save(path)
    return path
