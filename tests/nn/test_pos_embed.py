"""The position-embedding resampler shared by the plain models, and the class token's place in a sequence."""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from lbmamba.nn.pos_embed import (
    CLASS_TOKEN_PLACES,
    class_token_index,
    insert_class_token,
    resample_pos_embed,
    split_class_token,
)

PLACES = [p for p in CLASS_TOKEN_PLACES if p is not None]


def _embedding(num_patches, place, channels=6, seed=0, dtype=torch.float32):
    extra = place is not None
    return torch.randn(1, num_patches + extra, channels, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _bicubic(patches, old, new, antialias):
    """The patch entries resized on their grid, written out with F.interpolate."""
    c = patches.shape[-1]
    grid = patches.reshape(1, old[0], old[1], c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False, antialias=antialias)
    return grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], c)


def test_class_token_index_of_each_place():
    assert class_token_index(196, None) is None
    assert class_token_index(196, "head") == 0
    assert class_token_index(196, "middle") == 98  # Vim at 224 px: index 98 of 197
    assert class_token_index(196, "tail") == 196
    with pytest.raises(ValueError, match="class_token must be one of"):
        class_token_index(196, "first")


@pytest.mark.parametrize("place", CLASS_TOKEN_PLACES)
@pytest.mark.parametrize("num_patches", [1, 4, 9, 12])
def test_split_and_insert_are_inverse(place, num_patches):
    x = _embedding(num_patches, place).expand(3, -1, -1)
    patches, token = split_class_token(x, place)
    assert patches.shape == (3, num_patches, 6)
    if place is None:
        assert token is None and patches is x
    else:
        index = class_token_index(num_patches, place)
        assert token.shape == (3, 1, 6) and torch.equal(token, x[:, index:index + 1])
    assert torch.equal(insert_class_token(patches, token, place), x)


@pytest.mark.parametrize("place", CLASS_TOKEN_PLACES)
@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_the_same_grid_gives_the_embedding_itself(place, grid):
    pos = _embedding(grid[0] * grid[1], place)
    assert resample_pos_embed(pos, grid, grid, place) is pos


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("old, new", [((4, 4), (6, 6)), ((6, 6), (3, 3)), ((2, 3), (5, 4))])
def test_the_class_entry_is_kept_at_its_place_and_takes_no_part_in_the_resize(place, old, new):
    pos = _embedding(old[0] * old[1], place)
    out = resample_pos_embed(pos, new, old, place)
    n_new = new[0] * new[1]
    assert out.shape == (1, n_new + 1, 6)
    old_patches, old_token = split_class_token(pos, place)
    new_patches, new_token = split_class_token(out, place)
    assert torch.equal(new_token, old_token)
    assert torch.equal(out[:, class_token_index(n_new, place)], pos[:, class_token_index(old[0] * old[1], place)])
    assert torch.equal(new_patches, resample_pos_embed(old_patches, new, old))


@pytest.mark.parametrize("old, new", [((4, 4), (7, 7)), ((8, 8), (3, 3)), ((2, 6), (4, 3))])
def test_antialias_is_timms_resampler_and_without_it_the_plain_bicubic_resize(old, new):
    pos = _embedding(old[0] * old[1], None)
    timm_out = resample_abs_pos_embed(pos, list(new), list(old), num_prefix_tokens=0)
    assert torch.equal(resample_pos_embed(pos, new, old), timm_out)
    assert torch.equal(resample_pos_embed(pos, new, old, antialias=False), _bicubic(pos, old, new, antialias=False))
    with_head = _embedding(old[0] * old[1], "head")
    timm_out = resample_abs_pos_embed(with_head, list(new), list(old), num_prefix_tokens=1)
    assert torch.equal(resample_pos_embed(with_head, new, old, "head"), timm_out)


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("place", CLASS_TOKEN_PLACES)
def test_a_constant_embedding_stays_constant_on_any_grid(antialias, place):
    pos = torch.full((1, 16 + (place is not None), 3), 0.25)
    for new in [(8, 8), (2, 2), (3, 7)]:
        out = resample_pos_embed(pos, new, (4, 4), place, antialias=antialias)
        torch.testing.assert_close(out, torch.full_like(out, 0.25))


def test_the_old_grid_defaults_to_a_square_and_must_fit():
    pos = _embedding(16, "middle")
    assert torch.equal(resample_pos_embed(pos, (6, 6), None, "middle"), resample_pos_embed(pos, 6, (4, 4), "middle"))
    with pytest.raises(ValueError, match="cannot infer the position-embedding grid of 12 patch tokens"):
        resample_pos_embed(_embedding(12, None), (4, 4))
    with pytest.raises(ValueError, match=r"old_grid \(3, 5\) does not match 16 patch tokens"):
        resample_pos_embed(pos, (4, 4), (3, 5), "middle")
    with pytest.raises(ValueError, match="class_token must be one of"):
        resample_pos_embed(pos, (4, 4), class_token="end")


def test_dtypes_half_precision_through_float32_float64_in_float64():
    pos = _embedding(16, "tail", dtype=torch.float64)
    out = resample_pos_embed(pos, (5, 5), None, "tail", antialias=False)
    assert out.dtype == torch.float64
    assert torch.equal(out[:, :-1], _bicubic(pos[:, :-1], (4, 4), (5, 5), antialias=False))
    half = pos.to(torch.bfloat16)
    out = resample_pos_embed(half, (5, 5), None, "tail")
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, resample_pos_embed(half.float(), (5, 5), None, "tail").to(torch.bfloat16))


def test_a_table_without_a_batch_axis_resizes_the_same():
    table = _embedding(16, None)[0]  # (tokens, C), as the RoPE tables
    out = resample_pos_embed(table, (3, 3), antialias=False)
    assert out.shape == (9, 6) and torch.equal(out, resample_pos_embed(table[None], (3, 3), antialias=False)[0])
