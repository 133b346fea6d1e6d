"""The view geometry convention against numpy's own crop / flip / rot90 of a labelled image."""

import numpy as np
import pytest
import torch

from trainer.geometry import grid_in_box, ground_to_view, overlap, view_to_ground


def _cut(img: np.ndarray, box_px, flip_y, flip_x, rot) -> np.ndarray:
    y0, x0, y1, x1 = box_px
    v = img[y0:y1, x0:x1]
    if flip_y:
        v = v[::-1]
    if flip_x:
        v = v[:, ::-1]
    return np.rot90(v, rot, axes=(0, 1))


@pytest.mark.parametrize("flip_y", [False, True])
@pytest.mark.parametrize("flip_x", [False, True])
@pytest.mark.parametrize("rot", [0, 1, 2, 3])
def test_pixel_centres_map_to_the_pixel_numpy_puts_there(flip_y, flip_x, rot):
    n = 16
    img = np.arange(n * n).reshape(n, n)  # each pixel holds its own ground index
    box_px = (3, 5, 11, 13)  # 8 x 8
    view = _cut(img, box_px, flip_y, flip_x, rot)
    box = torch.tensor(box_px, dtype=torch.float64) / n
    m = view.shape[0]
    ii, jj = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
    uv = torch.tensor(np.stack([(ii + 0.5) / m, (jj + 0.5) / m], -1), dtype=torch.float64)
    ground = view_to_ground(uv, box, flip_y, flip_x, rot)
    gy, gx = (np.floor(ground[..., 0].numpy() * n).astype(int), np.floor(ground[..., 1].numpy() * n).astype(int))
    np.testing.assert_array_equal(img[gy, gx], view)
    back = ground_to_view(ground, box, flip_y, flip_x, rot)
    torch.testing.assert_close(back, uv)


def test_batched_parameters_broadcast():
    pts = torch.rand(3, 5, 2, dtype=torch.float64)
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.2, 0.1, 0.7, 0.9], [0.5, 0.5, 1.0, 1.0]], dtype=torch.float64)
    fy, fx, rot = torch.tensor([0, 1, 0]), torch.tensor([1, 0, 0]), torch.tensor([3, 1, 2])
    uv = ground_to_view(pts, box[:, None], fy[:, None], fx[:, None], rot[:, None])
    for b in range(3):
        one = ground_to_view(pts[b], box[b], bool(fy[b]), bool(fx[b]), int(rot[b]))
        torch.testing.assert_close(uv[b], one)


def test_overlap_and_grid():
    inter, ok = overlap(torch.tensor([[0.0, 0.0, 0.6, 0.6], [0.0, 0.0, 0.2, 0.2]]),
                        torch.tensor([[0.4, 0.3, 1.0, 1.0], [0.5, 0.5, 1.0, 1.0]]))
    torch.testing.assert_close(inter[0], torch.tensor([0.4, 0.3, 0.6, 0.6]))
    assert ok.tolist() == [True, False]
    g = grid_in_box(torch.tensor([0.0, 0.5, 1.0, 1.0]), 2)
    torch.testing.assert_close(g, torch.tensor([[0.25, 0.625], [0.25, 0.875], [0.75, 0.625], [0.75, 0.875]]))
