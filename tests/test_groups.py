"""Near-duplicate linking (dtl.data.groups) on small synthetic thumbnails, against oracles written
here: NCC computed directly on the overlapping windows, a brute-force nearest neighbour, a
hand-made union-find, the 8 symmetries of the square written out by hand."""

from __future__ import annotations

import base64
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from dtl.data import groups as G

R = np.arange(-G.MAX_SHIFT, G.MAX_SHIFT + 1)


def field(rng, sigma=2.0, lo=30, hi=225) -> np.ndarray:
    """A smooth random 32×32 "smear field" with values in [lo, hi]."""
    f = gaussian_filter(rng.normal(size=(G.THUMB, G.THUMB)), sigma, mode="wrap")
    return lo + (hi - lo) * (f - f.min()) / (f.max() - f.min())


def encode(a: np.ndarray) -> str:
    """A thumbnail as similar_pairs receives it (base64 of the 32×32 uint8 bytes)."""
    return base64.b64encode(np.clip(np.round(a), 0, 255).astype(np.uint8).tobytes()).decode()


def hashes(rng, n: int) -> list[int]:
    return [int(x) for x in rng.integers(0, 2**63, n, dtype=np.int64)]


def flip(h: int, bits) -> int:
    """``h`` with the given bit positions flipped (a hash ``len(bits)`` bits away)."""
    for b in bits:
        h ^= 1 << b
    return h


def hexes(hs) -> list[str]:
    return [f"{h:016x}" for h in hs]


def windows(s: int):
    """Rows (or columns) of the moved image and of the other one that overlap at shift ``s``."""
    return slice(max(0, s), G.THUMB + min(0, s)), slice(max(0, -s), G.THUMB + min(0, -s))


def ncc_oracle(a: np.ndarray, b: np.ndarray) -> float:
    """Best Pearson correlation of ``a`` and ``b`` over the shifts of at most MAX_SHIFT pixels that
    keep at least MIN_OVERLAP of the area (a flat window correlates 0)."""
    best = -1.0
    for dy in R:
        for dx in R:
            (ya, yb), (xa, xb) = windows(dy), windows(dx)
            wa, wb = a[ya, xa].ravel(), b[yb, xb].ravel()
            if wa.size < G.MIN_OVERLAP * G.THUMB**2:
                continue
            wa, wb = wa - wa.mean(), wb - wb.mean()
            den = np.sqrt((wa @ wa) * (wb @ wb))
            best = max(best, float(wa @ wb / den) if den > 1e-9 else 0.0)
    return best


# ------------------------------------------------------------------ thumbnails, hashes, symmetries

def test_thumbnail_is_the_box_average_of_the_grey_image_with_the_stamp_corner_blanked():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    rgb[200:, 190:] = 255  # a white scale-bar stamp in the bottom-right corner
    grey = np.asarray(Image.fromarray(rgb).convert("L")).astype(float)
    blanked = grey.copy()
    blanked[224 - 32:, 224 - 44:] = int(np.median(grey))  # 1/7 of the height, 11/56 of the width
    expected = blanked.reshape(32, 7, 32, 7).mean((1, 3))  # 224 / 32 = 7: each thumbnail pixel is a 7×7 block
    thumb = np.frombuffer(base64.b64decode(G.thumbnail(rgb)), np.uint8).reshape(32, 32)
    assert np.abs(thumb - expected).max() <= 1  # PIL's fixed-point box filter, rounded to a grey level


def test_decode_thumbs_round_trips_and_an_empty_string_is_a_flat_thumbnail():
    a = np.random.default_rng(1).integers(0, 256, (32, 32)).astype(np.uint8)
    out = G.decode_thumbs([encode(a), ""])
    assert out.shape == (2, 32, 32) and out.dtype == np.float32  # as documented
    assert np.array_equal(out[0], a) and not out[1].any()


def test_hash_bits_give_the_hamming_distance_of_the_hex_hashes():
    hs = ["ffffffffffffffff", "8000000000000001", "0123456789abcdef", "", "0000000000000000", "fedcba9876543210"]
    bits = G.hash_bits(hs)
    assert bits.shape == (6, 64) and bits.dtype == bool
    ints = [int(h, 16) if h else 0 for h in hs]
    for a in range(6):
        for b in range(6):
            assert (bits[a] != bits[b]).sum() == bin(ints[a] ^ ints[b]).count("1")
    assert not bits[3].any()  # no hash: all bits clear


# the 8 symmetries of [[1, 2], [3, 4]]: g % 4 quarter turns anticlockwise, then mirrored for g >= 4
SQUARE = np.array([[1, 2], [3, 4]])
SYMMETRIES = {0: [[1, 2], [3, 4]], 1: [[2, 4], [1, 3]], 2: [[4, 3], [2, 1]], 3: [[3, 1], [4, 2]],
              4: [[2, 1], [4, 3]], 5: [[4, 2], [3, 1]], 6: [[3, 4], [1, 2]], 7: [[1, 3], [2, 4]]}


def test_dihedral_gives_the_eight_symmetries_of_the_square_and_inverse_undoes_each():
    for g, expected in SYMMETRIES.items():
        assert np.array_equal(G.dihedral(SQUARE, g), expected), g
        assert np.array_equal(G.dihedral(np.array(expected), G.inverse(g)), SQUARE), g
    stack = np.stack([SQUARE, 10 * SQUARE])  # leading axes are images
    assert np.array_equal(G.dihedral(stack, 5)[1], 10 * np.array(SYMMETRIES[5]))


def test_centred_magnitude_puts_the_zero_frequency_in_the_middle_and_commutes_with_the_symmetries():
    rng = np.random.default_rng(2)
    w = G._windowed(np.stack([field(rng), field(rng)]))
    m = G.centred_magnitude(w)
    assert m.shape == (2, 31, 31)
    assert np.allclose(m[:, 15, 15], np.log1p(np.abs(w.sum((1, 2)))))  # zero frequency = |sum|
    assert np.allclose(m[:, 15, 16], np.log1p(np.abs(np.fft.fft2(w)[:, 0, 1])))
    assert np.allclose(m, m[:, ::-1, ::-1])  # a real image: symmetric about the zero frequency
    for g in range(8):
        assert np.allclose(G.centred_magnitude(G.dihedral(w, g)), G.dihedral(m, g)), g


def test_windowed_removes_each_thumbnails_own_mean():
    t = np.stack([np.full((32, 32), 10.0), np.full((32, 32), 200.0)])
    assert np.allclose(G._windowed(t), 0)
    x = field(np.random.default_rng(3))
    hann = np.outer(np.hanning(32), np.hanning(32))
    assert np.allclose(G._windowed(x[None])[0], (x - x.mean()) * hann)


def test_dihedral_descriptor_sorts_the_magnitude_over_each_frequency_orbit():
    """Oracle: for each orbit representative (row <= col <= 15 of the 31×31 centred grid), the 8
    points (±a, ±b), (±b, ±a) about the centre, their magnitudes sorted, every second one."""
    rng = np.random.default_rng(4)
    w = G._windowed(np.stack([field(rng, 1.5) for _ in range(7)]))
    desc = G.dihedral_descriptor(w, block=3)  # blocks of 3 images: 3 blocks, the last one short
    m = G.centred_magnitude(w)
    reps = [(r, c) for r in range(16) for c in range(r, 16)]
    assert desc.shape == (7, len(reps), 4)
    for k, (r, c) in enumerate(reps):
        a, b = r - 15, c - 15
        pts = [(15 + sa * a, 15 + sb * b) for sa in (1, -1) for sb in (1, -1)]
        pts += [(15 + sa * b, 15 + sb * a) for sa in (1, -1) for sb in (1, -1)]
        vals = np.sort(np.stack([m[:, y, x] for y, x in pts], 1), 1)[:, ::2]
        assert np.allclose(desc[:, k], vals), (r, c)
    for g in range(8):  # what it is for: the same descriptor for every turn and mirror
        assert np.allclose(G.dihedral_descriptor(G.dihedral(w, g)), desc), g


def test_stamp_box_marks_the_thumbnail_pixels_the_corner_blank_touches():
    """A 224-pixel image blanks rows 192-223 and columns 180-223; thumbnail pixel (r, c) averages
    rows 7r..7r+6 and columns 7c..7c+6, so rows 27-31 and columns 25-31 are touched."""
    expected = np.zeros((32, 32), bool)
    expected[27:, 25:] = True
    assert np.array_equal(G._stamp_box(), expected)


# ------------------------------------------------------------------ candidates

def nearest_oracle(x: np.ndarray, k: int) -> np.ndarray:
    """Sorted unique pairs (i < j) with j among i's k nearest by cosine of the centred rows, or vice versa."""
    f = x.reshape(len(x), -1)
    f = f - f.mean(0)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)
    k = min(k, len(x) - 1)
    pairs = {tuple(sorted((i, int(j)))) for i in range(len(x)) for j in np.argsort(-sim[i])[:k]}
    return np.array(sorted(pairs)).reshape(-1, 2)


def test_nearest_finds_each_rows_k_nearest_by_cosine_of_the_centred_features():
    rng = np.random.default_rng(5)
    # small values (cosine, not dot product), an offset per feature (centred first), rows of varied length
    x = (rng.normal(size=(40, 6)) + np.arange(6)) * rng.uniform(0.001, 0.01, (40, 1))
    for k in (1, 3, 7):
        assert np.array_equal(G._nearest(x, k), nearest_oracle(x, k)), k
    assert np.array_equal(G._nearest(x[:4], 5), [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])  # k >= n - 1: all


def test_nearest_on_more_rows_than_one_block_holds():
    x = np.random.default_rng(6).normal(size=(2100, 5))  # 1024-row blocks: 3 of them, the last short
    f = x - x.mean(0)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)
    expected = np.unique(np.sort(np.stack([np.arange(2100), sim.argmax(1)], 1), 1), axis=0)  # the nearest of each
    assert np.array_equal(G._nearest(x, 1), expected)


def test_candidates_of_tiny_sets():
    rng = np.random.default_rng(7)
    t = np.stack([field(rng) for _ in range(3)])
    for f in (G._candidates, G._turn_candidates):
        one = f(t[:1], 5)
        assert one.shape == (0, 2) and one.dtype.kind == "i"
        assert np.array_equal(f(t[:2], 5), [[0, 1]])
        assert np.array_equal(f(t, 5), [[0, 1], [0, 2], [1, 2]])  # each pair once
    assert G._turn_candidates(t[:0], 5).shape == (0, 2)


def test_candidates_find_a_shifted_copy_among_unrelated_fields():
    rng = np.random.default_rng(8)
    t = np.stack([field(rng) for _ in range(30)])
    t[17] = np.roll(t[4], (3, -5), (0, 1))
    assert [4, 17] in G._candidates(t, 1).tolist()
    assert [4, 17] in G._turn_candidates(t, 1).tolist()


# ------------------------------------------------------------------ shifted NCC

def test_window_sums_are_the_overlap_size_and_sums_of_each_shifted_window():
    t = np.random.default_rng(9).normal(size=(2, 32, 32))
    area, s1, s2 = G._window_sums(t)
    assert area.shape == (21, 21) and s1.shape == s2.shape == (2, 21, 21)
    for a, dy in enumerate(R):
        for b, dx in enumerate(R):
            ys, xs = windows(dy)[0], windows(dx)[0]
            assert area[a, b] == (32 - abs(dy)) * (32 - abs(dx))
            assert np.allclose(s1[:, a, b], t[:, ys, xs].sum((1, 2)))
            assert np.allclose(s2[:, a, b], (t[:, ys, xs] ** 2).sum((1, 2)))


def shifted_set(rng):
    """Fields and copies moved by a few pixels, by the largest allowed shift, and by one that leaves
    less than MIN_OVERLAP of the frame (10, 10: 22×22 pixels < half)."""
    a, b, c = field(rng), field(rng), field(rng)
    return np.stack([a, np.roll(a, (-3, 5), (0, 1)), b, np.roll(b, (0, -10), (0, 1)),
                     c, np.roll(c, (-10, -10), (0, 1)), field(rng)])


def test_shifted_ncc_is_the_best_correlation_over_the_allowed_shifts():
    t = shifted_set(np.random.default_rng(10))
    pairs = np.array([[0, 1], [2, 3], [4, 5], [1, 0], [0, 6], [3, 6], [2, 2]])
    expected = [ncc_oracle(t[i], t[j]) for i, j in pairs]
    assert expected[0] == pytest.approx(1) and expected[1] == pytest.approx(1) and expected[2] < 0.95
    assert np.allclose(G.shifted_ncc(t, pairs), expected, atol=1e-5)
    assert np.allclose(G.shifted_ncc(t, pairs, batch=2), expected, atol=1e-5)  # batches of 2 pairs
    other = np.stack([field(np.random.default_rng(11)), t[1]])  # image i of t against image j of other
    assert np.allclose(G.shifted_ncc(t, np.array([[0, 1], [0, 0], [6, 0]]), other=other),
                       [1, ncc_oracle(t[0], other[0]), ncc_oracle(t[6], other[0])], atol=1e-5)


def test_shifted_ncc_ignores_brightness_and_contrast():
    t = shifted_set(np.random.default_rng(12))
    pairs = np.array([[0, 1], [0, 6], [4, 5], [2, 4]])
    plain = G.shifted_ncc(t, pairs)
    assert np.allclose(G.shifted_ncc(t * 1e-4, pairs), plain, atol=1e-5)  # a dim, low-contrast re-export
    assert np.allclose(G.shifted_ncc(t * 3 + 50, pairs), plain, atol=1e-5)


def test_a_flat_thumbnail_correlates_zero_with_anything():
    t = np.stack([np.zeros((32, 32)), field(np.random.default_rng(13))])
    assert np.array_equal(G.shifted_ncc(t, np.array([[0, 1], [1, 0], [0, 0]])), [0, 0, 0])


def test_shifted_ncc_of_no_pair_and_of_no_image_is_empty():
    """The 2026-12-03 rewrite reshaped by -1, which numpy refuses on a set of no image (caught by a
    mutant of similar_pairs that calls it on an empty candidate list)."""
    none, pairs = np.zeros((0, G.THUMB, G.THUMB)), np.zeros((0, 2), int)
    for t, other in ((none, None), (none, none), (np.stack([field(np.random.default_rng(14))]), None)):
        out = G.shifted_ncc(t, pairs, other=other)
        assert out.shape == (0,) and out.dtype == np.float32


# ------------------------------------------------------------------ turned and mirrored copies

def turned_set(rng):
    """A field, then each of its 7 other symmetries, each also moved by a pixel or two."""
    x = field(rng, 1.5)
    return np.stack([x] + [np.roll(G.dihedral(x, g), (g % 3 - 1, 1 - g % 2), (0, 1)) for g in range(1, 8)])


# the symmetries the magnitude can tell apart: g and g + 2 (turned 180° more) look alike
TURN_CLASS = {0: 0, 1: 1, 2: 0, 3: 1, 4: 4, 5: 5, 6: 4, 7: 5}


def test_turn_classes_tell_the_symmetry_up_to_a_half_turn():
    t = turned_set(np.random.default_rng(14))
    pairs = np.array([[0, g] for g in (1, 5, 2, 3, 4, 6, 7, 0)] + [[3, 0], [5, 1]])
    expected = [TURN_CLASS[g] for g in (1, 5, 2, 3, 4, 6, 7, 0)] + [TURN_CLASS[G.inverse(3)], TURN_CLASS[4]]
    for batch in (4096, 3):
        cls = G._turn_classes(t, pairs, batch=batch)
        assert cls.tolist() == expected and cls.dtype.kind == "i"


def test_turned_ncc_finds_the_symmetry_that_makes_the_copy():
    t = turned_set(np.random.default_rng(15))
    pairs = np.array([[0, g] for g in range(1, 8)])
    best, which = G.turned_ncc(t, pairs)
    assert which.tolist() == list(range(1, 8)) and which.dtype.kind == "i"  # a symmetry id, for transform_name
    assert (best > 0.95).all()  # moved a pixel or two: the masked corners differ a little
    best, which = G.turned_ncc(t, np.array([[0, 4]]))  # a mirrored copy alone
    assert which.tolist() == [4] and best[0] > 0.99


def test_turned_ncc_never_tries_the_identity():
    t = turned_set(np.random.default_rng(16))
    best, which = G.turned_ncc(t, np.array([[0, 0]]))  # an untouched image is no turned copy of itself:
    assert which.tolist() == [2] and best[0] < 0.6  # only the half turn is tried
    best, which = G.turned_ncc(t, np.zeros((0, 2), int))
    assert best.shape == which.shape == (0,)


def test_turned_ncc_ignores_the_stamp_corners_of_both_images():
    """Every thumbnail has its bottom-right stamp box blanked; a turned copy also carries the
    source's blanked box in another corner. Neither is evidence: the copy still scores 1."""
    rng = np.random.default_rng(17)
    box = G._stamp_box()
    x = field(rng, 1.5)
    x[box] = np.median(x)
    for g in (1, 4, 6):
        copy = G.dihedral(x, g).copy()
        copy[box] = np.median(copy)
        best, which = G.turned_ncc(np.stack([x, copy]), np.array([[0, 1]]))
        assert which[0] == g and best[0] > 0.9999, g


# ------------------------------------------------------------------ link limits

def three_fields(rng):
    """``a``; ``b``, a moved re-export of ``a`` mixed with another field; ``c``, a mirrored, dimmed ``b``
    mixed with a third. Hashes: b is 3 bits from a, c about 30 from both."""
    a, n1, n2 = field(rng), field(rng), field(rng)
    b = 0.75 * np.roll(a, (2, -3), (0, 1)) + 0.25 * n1
    c = 0.8 * G.dihedral(b, 4) + 0.2 * n2
    h = hashes(rng, 1)[0]
    return np.stack([a, b, c]), [h, flip(h, [1, 5, 9]), flip(h, range(20, 50))]


def test_link_limits_of_three_images_follow_their_best_pairs():
    """With 3 images each pair is about a third of the random pairs, so the 99th percentile is the
    best pair's score, and the closest 0.1% of hashes is the closest pair (3 bits)."""
    t, hs = three_fields(np.random.default_rng(20))
    pairs = np.array([[0, 1], [0, 2], [1, 2], [1, 0], [2, 0], [2, 1]])  # both orders are sampled
    best = G.shifted_ncc(t, pairs).max()
    best_turned = G.turned_ncc(t, pairs)[0].max()
    assert best > 0.9 and best_turned > 0.9  # a and b are one field; c is b mirrored
    threshold, floor, bits, turned = G.link_limits(t, G.hash_bits(hexes(hs)), n_random=300)
    assert threshold == pytest.approx(best + G.NULL_MARGIN, abs=1e-5)  # raised above SIM_THRESHOLD
    assert floor == pytest.approx(best, abs=1e-5)
    assert bits == 2  # below the closest random pair (3 bits), under HASH_BITS
    assert turned == pytest.approx(best_turned + G.NULL_MARGIN, abs=1e-5)  # raised above TURN_THRESHOLD


def test_link_limits_leave_copies_with_almost_the_same_hash_out_of_the_random_pairs():
    rng = np.random.default_rng(20)
    t, hs = three_fields(rng)
    t = np.concatenate([t, t[:1] + rng.normal(0, 1, (1, 32, 32))])  # d: a copy of a, its hash 2 bits away
    hs.append(flip(hs[0], [60, 61]))
    others = np.array([[i, j] for i in range(4) for j in range(4) if i != j and {i, j} != {0, 3}])
    threshold, floor, bits, _ = G.link_limits(t, G.hash_bits(hexes(hs)), n_random=300)
    assert floor == pytest.approx(G.shifted_ncc(t, others).max(), abs=1e-5) and floor < 0.99
    assert bits == 2  # a–d (2 bits) is no random pair: the closest is a–b (3 bits)


@pytest.mark.parametrize("n, same_hash", [(1, False), (2, False), (3, True), (5, True)])
def test_link_limits_keep_the_defaults_without_random_pairs_to_learn_from(n, same_hash):
    rng = np.random.default_rng(21)
    t = np.stack([field(rng) for _ in range(n)])
    hs = [7] * n if same_hash else hashes(rng, n)  # all copies of one hash: no pair counts as random
    assert G.link_limits(t, G.hash_bits(hexes(hs))) == (G.SIM_THRESHOLD, -1.0, G.HASH_BITS, G.TURN_THRESHOLD)
    assert G.link_limits(t, G.hash_bits(hexes(hs))) == (0.53, -1.0, 8, 0.7)


def test_link_limits_are_reproducible():
    rng = np.random.default_rng(22)
    t = np.stack([field(rng) for _ in range(30)])
    bits = G.hash_bits(hexes(hashes(rng, 30)))
    first = G.link_limits(t, bits, n_random=200)
    assert G.link_limits(t, bits, n_random=200) == first and -1 < first[1] < 1


# ------------------------------------------------------------------ similar pairs

def empty_pairs_frame_is_well_formed(out: pd.DataFrame) -> None:
    assert list(out.columns) == ["i", "j", "ncc", "hash_bits", "transform"] and len(out) == 0
    assert all(out[c].dtype.kind == "i" for c in ("i", "j", "hash_bits", "transform"))  # as when pairs are found
    assert out.attrs == {"ncc_threshold": 0.53, "hash_bits": 8, "turned_threshold": 0.7}


def test_similar_pairs_of_no_image_and_of_one_image_are_empty():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to average over is no reason to warn
        empty_pairs_frame_is_well_formed(G.similar_pairs([], []))
        empty_pairs_frame_is_well_formed(G.similar_pairs([encode(field(np.random.default_rng(23)))], ["00ff"]))


def linked_set(rng):
    """24 thumbnails: unrelated smooth fields, and
    1: 0 moved by (3, -4) pixels, new content in the strips it uncovers; its hash 20 bits away;
    3: a weak re-export of 2 (NCC about 0.71: between the random-pair floor and the threshold), 2 bits away;
    6: unrelated to 4, but its hash only 3 bits away;
    8: 7 turned 90° anticlockwise.
    Every thumbnail has its stamp box blanked."""
    f = [field(rng) for _ in range(24)]
    s, fresh = np.roll(f[0], (-3, 4), (0, 1)), field(rng)
    s[-3:], s[:, :4] = fresh[-3:], fresh[:, :4]
    f[1] = s
    f[3] = 0.55 * f[2] + 0.45 * field(rng)
    f[8] = G.dihedral(f[7], 1).copy()
    for x in f:
        x[G._stamp_box()] = np.median(x)
    hs = hashes(rng, 24)
    hs[1], hs[3], hs[6] = flip(hs[0], range(20)), flip(hs[2], [7, 40]), flip(hs[4], [3, 30, 50])
    return [encode(x) for x in f], hs


def test_similar_pairs_link_shifted_copies_hash_close_reexports_and_turned_copies_and_nothing_else():
    thumbs, hs = linked_set(np.random.default_rng(30))
    out = G.similar_pairs(thumbs, hexes(hs))
    raw = G.decode_thumbs(thumbs).astype(float)
    t = raw - raw.mean(0)  # the set's mean thumbnail is no evidence
    limits = out.attrs
    assert set(limits) == {"ncc_threshold", "hash_bits", "turned_threshold"} and limits["hash_bits"] == 2
    for key in ("ncc_threshold", "turned_threshold"):  # raised above the defaults here, given to 4 decimals
        assert limits[key] * 1e4 == pytest.approx(round(limits[key] * 1e4), abs=1e-6)
    assert out[["i", "j", "transform"]].to_numpy().tolist() == [[0, 1, 0], [2, 3, 0], [7, 8, 1]]
    assert out["transform"].dtype.kind == "i"  # a symmetry id: transform_name(1) is "rotated 90°"
    assert out["hash_bits"].tolist() == [bin(hs[i] ^ hs[j]).count("1") for i, j in [(0, 1), (2, 3), (7, 8)]]
    turned = G.turned_ncc(t, np.array([[7, 8]]))[0][0]
    expected = [ncc_oracle(t[0], t[1]), ncc_oracle(t[2], t[3]), turned]
    assert turned > 0.9 and np.allclose(out["ncc"], expected, atol=1e-4)
    assert expected[1] < limits["ncc_threshold"] < expected[0]  # 3 is linked by its close hash only
    assert G.TURN_THRESHOLD < limits["turned_threshold"] < expected[2]
    assert np.allclose(out["ncc"] * 1e4, np.round(out["ncc"] * 1e4), atol=1e-2)  # 4 decimals


def test_two_images_with_one_hash_are_linked_whatever_their_thumbnails():
    """Too few images to learn a floor from: a close hash links on its own. With two images, removing
    the set's mean leaves (a - b) / 2 and its negative, which correlate poorly at any shift."""
    rng = np.random.default_rng(31)
    a, b = field(rng), field(rng)
    out = G.similar_pairs([encode(a), encode(b)], ["0123456789abcdef", "0123456789abcdee"])
    d = (np.round(a) - np.round(b)) / 2
    assert out[["i", "j", "hash_bits", "transform"]].to_numpy().tolist() == [[0, 1, 1, 0]]
    assert out["ncc"].iloc[0] == pytest.approx(ncc_oracle(d, -d), abs=1e-4) and out["ncc"].iloc[0] < 0.5


def test_an_identical_copy_of_a_half_turn_symmetric_image_is_reported_as_it_is():
    """The copy is also the image turned 180° (as well as, not better): no turn is reported."""
    rng = np.random.default_rng(32)
    sym = [(x + np.rot90(x, 2)) / 2 for x in (field(rng), field(rng))]
    out = G.similar_pairs([encode(sym[0]), encode(sym[0]), encode(sym[1])], hexes([5, 5, 2**62 + 2**40 - 1]))
    assert out[["i", "j", "hash_bits", "transform"]].to_numpy().tolist() == [[0, 1, 0, 0]]
    assert out["ncc"].tolist() == [1.0]


# ------------------------------------------------------------------ clusters and groups

def union_find(n: int, edges) -> list[set[int]]:
    parent = list(range(n))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i
    for i, j in edges:
        parent[root(i)] = root(j)
    clusters: dict[int, set[int]] = {}
    for i in range(n):
        clusters.setdefault(root(i), set()).add(i)
    return sorted(clusters.values(), key=min)


def clusters_of(labels) -> list[set[int]]:
    out: dict[int, set[int]] = {}
    for i, c in enumerate(labels):
        out.setdefault(int(c), set()).add(i)
    return sorted(out.values(), key=min)


def test_components_are_the_union_find_clusters_of_the_edges():
    rng = np.random.default_rng(40)
    edges = rng.integers(0, 30, (18, 2))
    edges[:, 1][edges[:, 0] < 15] = np.maximum(edges[:, 1], edges[:, 0])[edges[:, 0] < 15]  # some i <= j, some not
    assert clusters_of(G.components(30, edges)) == union_find(30, edges.tolist())
    assert clusters_of(G.components(4, [[3, 1]])) == [{0}, {1, 3}, {2}]  # a list; linked either way round
    assert G.components(1, []).tolist() == [0] and G.components(3, []).tolist() == [0, 1, 2]
    none = G.components(0, [])
    assert none.shape == (0,) and none.dtype.kind == "i"


@pytest.mark.parametrize("path, number", [
    ("WBC-Malignant-Pre-105.jpg", 105), ("Pre/WBC-Malignant-Pre-007.jpg", 7), ("x-5.jpg", 5),
    ("Pre-3/notes.jpg", None), ("set2/Pre-3/notes.jpg", None),  # the folder's digits are not the file's
    ("slide-7.jp2", 7), ("run1.img-7.png", 7), ("a/b/scan 12b.tif", 12), ("plain", None),
])
def test_file_number_is_the_last_digits_of_the_file_name(path, number):
    assert G.file_number(path) == number


def test_block_edges_without_shared_blocks_are_an_empty_edge_list():
    edges = G.block_edges(pd.Series(["a/x-1.jpg", "b/x-2.jpg", "a/x-30.jpg"]), pd.Series(["a", "b", "a"]), 20)
    assert edges.shape == (0, 2) and edges.dtype.kind == "i"


def test_assign_groups_keeps_the_tables_index():
    df = pd.DataFrame({"path": ["c.jpg", "a.jpg", "b.jpg"], "label": ["x"] * 3}, index=[10, 11, 12])
    g = G.assign_groups(df, "near-duplicate-groups", 20, pd.DataFrame({"i": [0], "j": [1]}))
    assert g.to_dict() == {10: "a.jpg", 11: "a.jpg", 12: "b.jpg"}  # named by the first member's path
    df["group"] = g  # aligns on the index
    assert df["group"].tolist() == ["a.jpg", "a.jpg", "b.jpg"]


def test_cross_split_pairs_name_both_images_their_splits_and_the_turn():
    df = pd.DataFrame({"path": ["p0", "p1", "p2", "p3"], "split": ["train", "val", "train", "test"]})
    pairs = pd.DataFrame({"i": [0, 0, 1, 2], "j": [1, 2, 3, 3], "ncc": [0.9, 0.8, 0.7, 0.6],
                          "hash_bits": [3, 4, 5, 6], "transform": [1, 0, 0, 5]})
    expected = pd.DataFrame({"a": ["p0", "p1", "p2"], "b": ["p1", "p3", "p3"], "split_a": ["train", "val", "train"],
                             "split_b": ["val", "test", "test"], "ncc": [0.9, 0.7, 0.6], "hash_bits": [3, 5, 6],
                             "transform": ["rotated 90°", "", "rotated 90°, mirrored"]})
    pd.testing.assert_frame_equal(G.cross_split_pairs(df, pairs), expected)
    assert len(G.cross_split_pairs(df, pairs.iloc[:0])) == 0


def test_a_close_hash_links_two_photos_that_each_have_closer_look_alikes():
    """24 near-copies of x and 24 of y fill each one's nearest-neighbour lists, so only the hash
    makes x–y (the last two images) a candidate. All hashes are within 2 bits: no pair is random,
    no floor, and every pair is linked by its hash."""
    rng = np.random.default_rng(60)
    x, y = field(rng), field(rng)
    thumbs = [encode(a + rng.normal(0, 1, a.shape)) for a in [x] * 24 + [y] * 24 + [x, y]]  # each freshly noisy
    h = hashes(rng, 1)[0]
    out = G.similar_pairs(thumbs, hexes([h] * 24 + [flip(h, [9])] * 24 + [h, flip(h, [9])]))
    raw = G.decode_thumbs(thumbs)
    assert [48, 49] not in np.concatenate([G._candidates(raw, G.NEIGHBOURS), G._turn_candidates(raw, 8)]).tolist()
    assert sorted(map(tuple, out[["i", "j"]].to_numpy().tolist())) == [(i, j) for i in range(50) for j in range(i + 1, 50)]
