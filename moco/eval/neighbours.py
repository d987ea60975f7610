"""The nearest-neighbour picture: for a few test images, their nearest training images by the
evaluated features and by raw pixels, side by side. A kNN score says how often the neighbours
share the label; the picture shows what the features call similar."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from moco.eval.knn import knn_search


def query_indices(labels: torch.Tensor, count: int, seed: int = 0) -> list[int]:
    """``count`` test images, classes in turn (0, 1, 2, ...), each a random member of its class
    drawn with ``seed``: every class appears before any appears twice."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    by_class: dict[int, list[int]] = {}
    for index in order.tolist():
        by_class.setdefault(int(labels[index]), []).append(index)
    queues = [by_class[c] for c in sorted(by_class)]
    picked: list[int] = []
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked


def nearest(bank: torch.Tensor, queries: torch.Tensor, count: int) -> torch.Tensor:
    """Bank indices of the ``count`` most cosine-similar rows for each query (Q x count)."""
    return knn_search(bank, queries, count, num_threads=1)[1]


def _displayable(image: torch.Tensor):
    """C x H x W (normalised) -> H x W or H x W x 3 in [0, 1], stretched per image."""
    image = image.float()
    image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-8)
    return image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()


def plot_neighbours(
    path: Path,
    test_set: Dataset,
    train_set: Dataset,
    queries: list[int],
    blocks: dict[str, torch.Tensor],
    title: str,
) -> None:
    """One row per query: the test image, then for each block (name -> Q x n train indices) its
    neighbours, framed green when they share the query's label and red when they do not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = next(iter(blocks.values())).shape[1]
    columns = 1 + len(blocks) * (count + 1)  # the query, then a spacer and n images per block
    fig, axes = plt.subplots(
        len(queries), columns, figsize=(0.75 * columns, 0.8 * len(queries) + 0.6), squeeze=False
    )
    for row, query in enumerate(queries):
        image, label = test_set[query]
        cells = [(image, None)]
        for indices in blocks.values():
            cells.append(None)  # spacer
            cells += [(train_set[int(i)][0], train_set[int(i)][1] == label) for i in indices[row]]
        for ax, cell in zip(axes[row], cells, strict=True):
            ax.set_xticks([])
            ax.set_yticks([])
            if cell is None:
                ax.axis("off")
                continue
            picture, same = cell
            ax.imshow(_displayable(picture), cmap="gray")
            colour = "black" if same is None else ("tab:green" if same else "tab:red")
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(1 if same is None else 2.5)
    axes[0][0].set_title("test image", fontsize=8)
    for b, (name, indices) in enumerate(blocks.items()):
        labels = torch.tensor([int(test_set[q][1]) for q in queries]).unsqueeze(1)
        found = torch.tensor([[int(train_set[int(i)][1]) for i in row] for row in indices])
        share = (found == labels).float().mean().item()
        first = 1 + b * (count + 1) + 1
        axes[0][first + count // 2].set_title(
            f"nearest by {name} ({share:.0%} same class)", fontsize=8
        )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
