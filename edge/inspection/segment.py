"""Post-processing `segment`: semantic masks [classes, H, W] -> defect areas (original pixels and
share of the image) and connected regions' bounding boxes -> a defect decision. Pure numpy.
"""

from __future__ import annotations

import numpy as np

from fieldline.edge.inspection.preprocess import (
    ClassArea,
    Decision,
    Geometry,
    PayloadError,
    Region,
)
from fieldline.shared.policy import Postprocess

CLEAN_LABEL = "ok"


def class_masks(output: np.ndarray, post: Postprocess) -> np.ndarray:
    """[classes, H, W] scores -> [classes, H, W] bool: argmax class with probability >= threshold.

    One channel is a binary mask: probability (sigmoid of a logit when `softmax`) >= threshold.
    """
    x = np.asarray(output, dtype=np.float32)
    if x.ndim != 3 or x.shape[0] < 1:
        raise PayloadError("output", f"segment output must be [classes, H, W], got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise PayloadError("output", "model produced a non-finite mask")
    if x.shape[0] == 1:
        prob = 1.0 / (1.0 + np.exp(-x)) if post.softmax else x
        return prob >= post.threshold
    if post.softmax:
        z = np.exp(x - x.max(axis=0, keepdims=True))
        x = z / z.sum(axis=0, keepdims=True)
    winner = np.argmax(x, axis=0)  # [H, W]
    classes = np.arange(x.shape[0])[:, None, None]
    return (winner[None] == classes) & (x >= post.threshold)


def connected_regions(mask: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """8-connected regions of a 2-D bool mask: (pixels, x1, y1, x2, y2), x2/y2 exclusive.

    Run-length union-find: the runs of each row are found with numpy, then joined to the
    overlapping runs of the row above; Python loops over runs, not pixels.
    """
    padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1)))
    edges = np.diff(padded, axis=1)
    starts = np.argwhere(edges == 1)  # (row, col) sorted by row, then col
    ends = np.argwhere(edges == -1)[:, 1]
    rows, cols = starts[:, 0], starts[:, 1]
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(rows, np.arange(mask.shape[0] + 1))
    for r in range(1, mask.shape[0]):
        a, a_end = int(row_first[r - 1]), int(row_first[r])
        for b in range(int(row_first[r]), int(row_first[r + 1])):
            # runs [start, end); 8-connected when they touch diagonally too
            while a < a_end and ends[a] < cols[b]:
                a += 1
            j = a
            while j < a_end and cols[j] <= ends[b]:
                parent[find(b)] = find(j)
                j += 1
    regions: dict[int, list[int]] = {}
    for i in range(len(rows)):
        root = find(i)
        r, c0, c1 = int(rows[i]), int(cols[i]), int(ends[i])
        acc = regions.get(root)
        if acc is None:
            regions[root] = [c1 - c0, c0, r, c1, r + 1]
        else:
            acc[0] += c1 - c0
            acc[1], acc[2] = min(acc[1], c0), min(acc[2], r)
            acc[3], acc[4] = max(acc[3], c1), max(acc[4], r + 1)
    return sorted((tuple(v) for v in regions.values()), reverse=True)  # type: ignore[misc]


def decide_segment(output: np.ndarray, post: Postprocess, geometry: Geometry | None) -> Decision:
    """Masks -> areas of the defect labels, their regions, and the verdict.

    The mask covers the model input (at its own resolution); padding added by the letterbox is
    not part of the image and is ignored. A defect label counts when its area reaches both
    min_area_px and min_area_share.
    """
    masks = class_masks(output, post)
    _, mask_h, mask_w = masks.shape
    geo = geometry or Geometry.identity(mask_h, mask_w)
    # mask pixel -> input pixels -> original pixels
    fx, fy = geo.input_w / mask_w, geo.input_h / mask_h
    px_area = fx * fy / (geo.scale_x * geo.scale_y)
    x0, y0 = round(geo.pad_x / fx), round(geo.pad_y / fy)
    x1 = round((geo.pad_x + geo.orig_w * geo.scale_x) / fx)
    y1 = round((geo.pad_y + geo.orig_h * geo.scale_y) / fy)
    image_area = float(geo.orig_h * geo.orig_w)
    areas: list[ClassArea] = []
    regions: list[Region] = []
    for c, name in enumerate(post.labels[: masks.shape[0]]):
        if name not in post.defect_labels:
            continue
        mask = np.zeros_like(masks[c])
        mask[y0:y1, x0:x1] = masks[c, y0:y1, x0:x1]
        area = float(mask.sum()) * px_area
        areas.append(ClassArea(name, round(area, 2), round(area / image_area, 6)))
        if post.max_regions == 0 or not area:
            continue
        for pixels, rx1, ry1, rx2, ry2 in connected_regions(mask)[: post.max_regions]:
            box = geo.to_original(np.array([[rx1 * fx, ry1 * fy, rx2 * fx, ry2 * fy]]))[0]
            r_area = pixels * px_area
            regions.append(
                Region(
                    name,
                    round(r_area, 2),
                    round(r_area / image_area, 6),
                    *(round(float(v), 2) for v in box),
                )
            )
    regions = sorted(regions, key=lambda r: -r.area_px)[: post.max_regions]
    hits = [
        a
        for a in areas
        if a.area_px > 0 and a.area_px >= post.min_area_px and a.share >= post.min_area_share
    ]
    top = max(hits or areas, key=lambda a: a.area_px, default=None)
    score = top.share if top is not None else 0.0
    label = top.label if hits and top is not None else CLEAN_LABEL
    return Decision(label, score, bool(hits), areas=tuple(areas), regions=tuple(regions))
