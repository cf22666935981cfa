"""Near-duplicate clusters and the groupings that split protocols keep on one side.

Aria releases several photos of one smear field: shifted by up to a third of the frame,
refocused, or re-exported. A perceptual hash finds only the unshifted ones, so two images are
linked when either

* their perceptual hashes differ by at most :data:`HASH_BITS` bits, or
* their greyscale thumbnails, compared at the best relative shift (up to :data:`MAX_SHIFT`
  thumbnail pixels, overlap at least :data:`MIN_OVERLAP`), have a normalised cross-correlation
  of at least :data:`SIM_THRESHOLD`. NCC ignores brightness and contrast (re-exports), and a
  32-pixel thumbnail ignores focus and JPEG detail.

Comparing every pair at every shift is too slow, so candidates come from a shift-invariant
descriptor (the magnitude of the thumbnail's Fourier transform): each image's
:data:`NEIGHBOURS` nearest images are verified with the shifted NCC, computed for all shifts
at once by FFT cross-correlation. Linked images form clusters (connected components, i.e.
union-find over the pairs). The thresholds were set by looking at pairs on both sides of them
in Aria ``Original`` (about 60 pairs): shifted photos of one field score down to 0.55
(Pre-225/227, refocused and shifted), different fields up to 0.54 (Benign-242/285, merged: a
false merge only costs a little split balance, a missed pair leaks), pairs across classes
from 0.50 down. Candidates are the weak link: with 8 neighbours per descriptor, 18 pairs of
fields shifted by a third of the frame were missed, hence 24.

Pre-augmented sets save each image again turned by a multiple of 90° or mirrored (the 8
symmetries of the square, :func:`dihedral`), which neither descriptor sees (the magnitude of a
turned image is the turned magnitude). A third one is left unchanged by all 8: the magnitude
sorted over each frequency's orbit (:func:`dihedral_descriptor`). Its :data:`TURN_NEIGHBOURS`
nearest are also compared turned (:func:`turned_ncc`: at the symmetries that the magnitudes
allow, the stamp corners blanked), and linked at :data:`TURN_THRESHOLD` or above; the pair
records the symmetry (:func:`transform_name`). Links of untouched images are as before.
"""

from __future__ import annotations

import base64
import re

import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from threadpoolctl import threadpool_limits

THUMB = 32  # thumbnail side in pixels
HASH_BITS = 8  # perceptual-hash distance that links two images on its own
SIM_THRESHOLD = 0.53  # shifted NCC of thumbnails that links two images
NULL_MARGIN = 0.2  # a link must also beat the set's 99th-percentile random-pair NCC by this much
MAX_SHIFT = 10  # largest relative shift tried, in thumbnail pixels (~31% of the frame)
MIN_OVERLAP = 0.5  # smallest overlap (share of the thumbnail area) a shift may leave
NEIGHBOURS = 24  # candidates per image from each descriptor (8 missed fields shifted by a third)
TURN_NEIGHBOURS = 8  # candidates per image from the descriptor that turns and mirrors leave alone
TURN_THRESHOLD = 0.7  # NCC that links a turned or mirrored copy (unrelated Aria fields: up to 0.62)
CORNER_BLANK = (1 / 7, 11 / 56)  # bottom-right (height, width) share ignored: scale-bar stamps
FILE_NUMBER = re.compile(r"(\d+)\D*$")
PARAMS = (f"{THUMB}|{HASH_BITS}|{SIM_THRESHOLD}|{NULL_MARGIN}|{MAX_SHIFT}|{MIN_OVERLAP}|{NEIGHBOURS}|"
          f"{TURN_NEIGHBOURS}|{TURN_THRESHOLD}|3")  # in the cache key of the linked pairs: change -> re-linked


def thumbnail(rgb: np.ndarray) -> str:
    """The image's greyscale ``THUMB``×``THUMB`` thumbnail (bottom-right stamp blanked), base64."""
    grey = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.uint8).copy()
    h, w = grey.shape
    bh, bw = int(round(CORNER_BLANK[0] * h)), int(round(CORNER_BLANK[1] * w))
    grey[h - bh:, w - bw:] = int(np.median(grey))  # stamps are identical across images: not evidence
    small = np.asarray(Image.fromarray(grey).resize((THUMB, THUMB), Image.BOX), dtype=np.uint8)
    return base64.b64encode(small.tobytes()).decode()


def decode_thumbs(values) -> np.ndarray:
    """N base64 thumbnails -> N×THUMB×THUMB float32 (an empty string gives a flat thumbnail)."""
    out = np.zeros((len(values), THUMB, THUMB), np.float32)
    for i, v in enumerate(values):
        if v:
            out[i] = np.frombuffer(base64.b64decode(v), np.uint8).reshape(THUMB, THUMB)
    return out


def hash_bits(phashes) -> np.ndarray:
    """Hex perceptual hashes -> N×64 bit matrix."""
    h = np.array([int(x, 16) if x else 0 for x in phashes], dtype=np.uint64)
    return np.unpackbits(h.view(np.uint8).reshape(-1, 8), axis=1).astype(bool)


def _candidates(t: np.ndarray, k: int) -> np.ndarray:
    """Pairs (i < j) where j is among i's ``k`` nearest by Fourier magnitude (finds shifted
    photos), or by the thumbnails themselves (finds refocused ones), or vice versa."""
    if len(t) < 2:
        return np.zeros((0, 2), int)
    mag = np.log1p(np.abs(np.fft.rfft2(_windowed(t))))
    return np.unique(np.concatenate([_nearest(mag, k), _nearest(t - t.mean(0), k)]), axis=0)


def _turn_candidates(t: np.ndarray, k: int) -> np.ndarray:
    """Pairs (i < j) where j is among i's ``k`` nearest by :func:`dihedral_descriptor`, or vice
    versa: turned and mirrored copies (and shifted ones)."""
    return _nearest(dihedral_descriptor(_windowed(t)), k) if len(t) >= 2 else np.zeros((0, 2), int)


def _windowed(t: np.ndarray) -> np.ndarray:
    """Each thumbnail less its mean, times a Hann window (no edge in the Fourier transform)."""
    return (t - t.mean((1, 2), keepdims=True)) * np.outer(np.hanning(THUMB), np.hanning(THUMB))


def dihedral(t: np.ndarray, g: int) -> np.ndarray:
    """Symmetry ``g`` (0-7) of the square images ``t`` (..., side, side): ``g % 4`` quarter turns
    anticlockwise, then, for ``g >= 4``, mirrored left to right."""
    out = np.rot90(t, g % 4, axes=(-2, -1))
    return out[..., ::-1] if g >= 4 else out


def inverse(g: int) -> int:
    """The symmetry that undoes ``g``: turns back the other way; mirrored ones are their own inverse."""
    return (4 - g) % 4 if g < 4 else g


def transform_name(g: int) -> str:
    """How the second image of a pair was made from the first: "" (as it is), "rotated 90°"
    (anticlockwise), "mirrored" (left to right), "rotated 90°, mirrored" (turned, then mirrored)."""
    return ", ".join(([f"rotated {90 * (g % 4)}°"] if g % 4 else []) + (["mirrored"] if g >= 4 else []))


def centred_magnitude(windowed: np.ndarray) -> np.ndarray:
    """log(1 + |Fourier transform|) with the zero frequency in the middle and the Nyquist row and
    column dropped: a grid symmetric about the zero frequency, on which a symmetry of the image
    is the same symmetry of the magnitude (and a shift of the image changes nothing)."""
    return np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(windowed), axes=(-2, -1))))[..., 1:, 1:]


def dihedral_descriptor(windowed: np.ndarray, block: int = 1024) -> np.ndarray:
    """A descriptor that the 8 symmetries of the square leave unchanged (and shifts, nearly): the
    :func:`centred_magnitude` sorted over each frequency's orbit, at the orbit's representatives
    (one triangle of one quadrant). The magnitude of a real image is symmetric about zero, so the
    8 sorted values come in equal pairs: 4 are kept."""
    c = THUMB // 2 - 1  # the zero frequency in the cropped grid
    rows, cols = np.triu_indices(c + 1)  # the triangle 0 <= row <= col <= c
    out = np.empty((len(windowed), len(rows), 4))
    for b in range(0, len(windowed), block):  # blocks: the 8 transforms of a block at a time
        mag = centred_magnitude(windowed[b:b + block])
        orbit = np.sort(np.stack([dihedral(mag, g)[:, rows, cols] for g in range(8)], 2), axis=2)
        out[b:b + block] = orbit[:, :, ::2]
    return out


def _turn_classes(t: np.ndarray, pairs: np.ndarray, batch: int = 4096) -> np.ndarray:
    """For each pair, which of the symmetries 0, 1, 4, 5 (as it is, turned 90°, mirrored, turned
    90° and mirrored) of image ``j``'s :func:`centred_magnitude` best matches image ``i``'s. The
    magnitude ignores shifts, but cannot tell ``g`` from ``g`` turned 180° more (``g + 2``)."""
    mag = centred_magnitude(_windowed(t)).astype(np.float32)
    mag -= mag.mean((1, 2), keepdims=True)
    mag /= np.linalg.norm(mag, axis=(1, 2), keepdims=True) + 1e-9
    reps = np.array([0, 1, 4, 5])
    out = np.zeros(len(pairs), int)
    for b in range(0, len(pairs), batch):
        mi, mj = mag[pairs[b:b + batch, 0]], mag[pairs[b:b + batch, 1]]
        sims = np.stack([(mi * dihedral(mj, g)).sum((1, 2)) for g in reps], 1)
        out[b:b + batch] = reps[sims.argmax(1)]
    return out


def _nearest(x: np.ndarray, k: int) -> np.ndarray:
    """Pairs (i < j) of each row's ``k`` nearest rows by cosine of the centred features."""
    n = len(x)
    mag = x.reshape(n, -1) - x.reshape(n, -1).mean(0)
    mag /= np.linalg.norm(mag, axis=1, keepdims=True) + 1e-9
    k = min(k, n - 1)
    nn = np.empty((n, k), int)
    for b in range(0, n, 1024):  # row blocks: memory stays n×1024 on large sets
        sim = mag[b:b + 1024] @ mag.T
        sim[np.arange(len(sim)), np.arange(b, b + len(sim))] = -np.inf
        nn[b:b + 1024] = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    pairs = np.stack([np.repeat(np.arange(n), k), nn.ravel()], 1)
    return np.unique(np.sort(pairs, 1), axis=0)


def _window_sums(t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every shift (dy, dx) in [-MAX_SHIFT, MAX_SHIFT]²: the overlap size and each image's sum
    and sum of squares over the part of it that overlaps (the image in the "moved" role)."""
    r = np.arange(-MAX_SHIFT, MAX_SHIFT + 1)
    lo, hi = np.maximum(0, r), THUMB + np.minimum(0, r)
    ii = np.pad(t, ((0, 0), (1, 0), (1, 0))).cumsum(1).cumsum(2)
    jj = np.pad(t * t, ((0, 0), (1, 0), (1, 0))).cumsum(1).cumsum(2)

    def box(c):
        return (c[:, hi][:, :, hi] - c[:, lo][:, :, hi] - c[:, hi][:, :, lo] + c[:, lo][:, :, lo])
    area = np.outer(hi - lo, hi - lo).astype(np.float32)
    return area, box(ii), box(jj)


def shifted_ncc(t: np.ndarray, pairs: np.ndarray, batch: int = 256,
                other: np.ndarray | None = None) -> np.ndarray:
    """Best normalised cross-correlation of each pair's thumbnails over the allowed shifts: image
    ``i`` of ``t`` against image ``j`` of ``other`` (default: of ``t`` too)."""
    n2 = 16 * -(-(THUMB + MAX_SHIFT) // 16)  # zero padding: no shift up to MAX_SHIFT wraps around
    spec = np.fft.rfft2(t, s=(n2, n2))
    area, s1, s2 = _window_sums(t)
    spec_j, s1_j, s2_j = (spec, s1, s2) if other is None else (np.fft.rfft2(other, s=(n2, n2)),
                                                               *_window_sums(other)[1:])
    conj_j = np.conj(spec_j)
    # Only the shifts that leave MIN_OVERLAP, flattened; what depends on one image alone (its sums,
    # its clipped variance term) is computed once per image instead of once per pair. Image i is in
    # the "moved" role at shift s, image j over the mirrored window (-s; the overlap area is symmetric).
    ok = (area >= MIN_OVERLAP * THUMB * THUMB).ravel()
    shifts = np.nonzero(ok)[0]
    sums_i = s1.reshape(len(s1), ok.size)[:, shifts]  # (sizes, not -1: a set of no image reshapes too)
    var_i = np.clip(s2 - s1 ** 2 / area, 1e-6, None).reshape(len(s1), ok.size)[:, shifts]
    sums_j = s1_j[:, ::-1, ::-1].reshape(len(s1_j), ok.size)[:, shifts]
    var_j = np.clip(s2_j - s1_j ** 2 / area, 1e-6, None)[:, ::-1, ::-1].reshape(len(s1_j), ok.size)[:, shifts]
    a = area.ravel()[shifts]
    r = np.arange(-MAX_SHIFT, MAX_SHIFT + 1) % n2  # the shifts' rows and columns in the n2 × n2 correlation
    dy, dx = shifts // len(r), r[shifts % len(r)]
    out = np.full(len(pairs), -1.0, np.float32)
    for b in range(0, len(pairs), batch):  # small batches stay in the cache
        i, j = pairs[b:b + batch, 0], pairs[b:b + batch, 1]
        # irfft2 is ifft over the rows, then irfft over the columns: only the shifts' rows are inverted
        rows = np.fft.ifft(spec[i] * conj_j[j], axis=1)[:, r]
        cc = np.fft.irfft(rows, n=n2, axis=2)[:, dy, dx]  # sum a[p+s] b[p], at each kept shift
        best = ((cc - sums_i[i] * sums_j[j] / a) / np.sqrt(var_i[i] * var_j[j])).max(1)
        out[b:b + batch] = np.maximum(best, -1) if len(shifts) < len(ok) else best  # the others score -1
    return out


def _stamp_box() -> np.ndarray:
    """The thumbnail pixels that the bottom-right stamp blank (:data:`CORNER_BLANK`) touches."""
    box = np.zeros((THUMB, THUMB), bool)
    box[THUMB - int(np.ceil(CORNER_BLANK[0] * THUMB)):, THUMB - int(np.ceil(CORNER_BLANK[1] * THUMB)):] = True
    return box


def turned_ncc(t: np.ndarray, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The best shifted NCC of each pair over the symmetries of the square other than the
    identity, and which: the symmetry (:func:`dihedral`) that makes ``j`` from ``i``. Of the 7,
    the two that :func:`_turn_classes` leaves (``g`` and ``g + 2``; 180° alone where ``g`` is the
    identity) are tried: image ``i`` against symmetry ``g`` of image ``j``. The stamp corner of
    both (the bottom-right box blanked in every thumbnail, which ``g`` moves to another corner,
    where a turned copy has its stamp) is blanked in both: neither a stamp nor a blank is evidence."""
    box = _stamp_box()
    best, which = np.full(len(pairs), -1.0, np.float32), np.zeros(len(pairs), int)
    cls = _turn_classes(t, pairs) if len(pairs) else np.zeros(0, int)
    for g in range(1, 8):
        sel = np.nonzero((cls == g) | (cls + 2 == g))[0]
        if not len(sel):
            continue
        mask = box | dihedral(box, g)
        used = np.unique(pairs[sel])  # only the images these pairs use: the transforms cost per image
        sub = t[used]
        score = shifted_ncc(_blanked(sub, mask), np.searchsorted(used, pairs[sel]),
                            other=_blanked(dihedral(sub, g), mask))
        better = score > best[sel]
        best[sel[better]], which[sel[better]] = score[better], inverse(g)
    return best, which


def _blanked(t: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``t`` with the ``mask`` pixels of every image set to that image's mean."""
    out = np.array(t)
    out[:, mask] = t.mean((1, 2))[:, None]
    return out


def similar_pairs(thumbs, phashes) -> pd.DataFrame:
    """All linked pairs (index i < j, NCC score, hash distance, symmetry ``transform`` that makes j
    from i: :func:`transform_name`) among the images."""
    raw = decode_thumbs(list(thumbs)).astype(np.float64)
    # What every image shares (a centred cell in single-cell sets, sensor dust in Aria) is not
    # evidence of a duplicate: correlate what is left after removing the set's mean thumbnail.
    t = raw - raw.mean(0) if len(raw) > 1 else raw
    bits = hash_bits(list(phashes))
    with threadpool_limits(1):  # BLAS threads fight each other on small matrices; one is fastest
        cand = _candidates(raw, NEIGHBOURS)
        close = [(i, int(j)) for i in range(len(bits) - 1)
                 for j in i + 1 + np.nonzero((bits[i + 1:] != bits[i]).sum(1) <= HASH_BITS)[0]]
        turn_cand = _turn_candidates(raw, TURN_NEIGHBOURS)
        cand = np.unique(np.concatenate([cand, np.array(close, int).reshape(-1, 2), turn_cand]), axis=0)
        score = shifted_ncc(t, cand) if len(cand) else np.zeros(0, np.float32)
        turned, which = np.full(len(cand), -1.0, np.float32), np.zeros(len(cand), int)
        at = np.searchsorted(cand[:, 0] * len(t) + cand[:, 1], turn_cand[:, 0] * len(t) + turn_cand[:, 1])
        turned[at], which[at] = turned_ncc(t, turn_cand)
        threshold, floor, bits_limit, turn_threshold = link_limits(t, bits)
    dist = (bits[cand[:, 0]] != bits[cand[:, 1]]).sum(1) if len(cand) else np.zeros(0, int)
    # a close hash alone also matches unrelated fields (Aria Early-300/748 at 8 bits): it links
    # only when the thumbnails also agree better than 99% of random pairs do
    keep = (score >= threshold) | ((dist <= bits_limit) & (score >= floor))
    # a turned or mirrored copy: its own, higher bar (a best of several symmetries is a higher score)
    turn = (turned >= turn_threshold) & (turned > score)
    keep |= turn
    out = pd.DataFrame({"i": cand[keep, 0], "j": cand[keep, 1],
                        "ncc": np.where(turn, turned, score)[keep].round(4), "hash_bits": dist[keep],
                        "transform": np.where(turn, which, 0)[keep]})
    out.attrs.update(ncc_threshold=round(float(threshold), 4), hash_bits=int(bits_limit),
                     turned_threshold=round(float(turn_threshold), 4))
    return out


def link_limits(t: np.ndarray, bits: np.ndarray, n_random: int = 2000) -> tuple[float, float, int, float]:
    """The NCC a link needs, the NCC floor of a hash link (the 99th percentile of random pairs),
    the hash distance a link needs in this set, and the NCC a turned or mirrored link needs.
    NCC: SIM_THRESHOLD (fitted on Aria's smear fields, where 99% of random pairs score below
    0.31), raised where random pairs already correlate (centred single cells: PBC 0.49, C-NMC on
    black 0.86) to :data:`NULL_MARGIN` above the set's 99th-percentile random-pair score. Hash:
    HASH_BITS, lowered below the closest 0.1% of random pairs where unrelated images hash alike
    (simple synthetic cells). Turned: :data:`TURN_THRESHOLD`, raised by the same rule on random
    pairs at their best turn (:func:`turned_ncc`; round cells match some turn of each other better)."""
    if len(t) < 3:
        return SIM_THRESHOLD, -1.0, HASH_BITS, TURN_THRESHOLD
    pick = np.random.default_rng(0).integers(0, len(t), (n_random, 2))
    dist = (bits[pick[:, 0]] != bits[pick[:, 1]]).sum(1)
    # copies with (almost) the same hash are not "random": in a small set they would be a large
    # share of the sample and raise the bar above themselves
    pick, dist = pick[(pick[:, 0] != pick[:, 1]) & (dist > 2)], dist[(pick[:, 0] != pick[:, 1]) & (dist > 2)]
    if not len(pick):
        return SIM_THRESHOLD, -1.0, HASH_BITS, TURN_THRESHOLD
    q99 = float(np.quantile(shifted_ncc(t, pick), 0.99))
    q99_turned = float(np.quantile(turned_ncc(t, pick)[0], 0.99))
    near = int(np.quantile(dist, 0.001))
    return (max(SIM_THRESHOLD, q99 + NULL_MARGIN), q99, min(HASH_BITS, near - 1),
            max(TURN_THRESHOLD, q99_turned + NULL_MARGIN))


def components(n: int, edges: np.ndarray) -> np.ndarray:
    """Cluster id of each of ``n`` items linked by ``edges`` (union-find = connected components)."""
    if n == 0:
        return np.zeros(0, int)
    e = np.asarray(edges, int).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def file_number(path: str) -> int | None:
    """The acquisition number in a name like ``WBC-Malignant-Pre-105.jpg`` (the last digits)."""
    m = FILE_NUMBER.search(path.rsplit("/", 1)[-1].rsplit(".", 1)[0])
    return int(m.group(1)) if m else None


def block_edges(paths: pd.Series, labels: pd.Series, block_size: int) -> np.ndarray:
    """Edges joining images of one class whose file numbers fall in the same run of
    ``block_size`` numbers (1-20, 21-40, ...); files without a number stay alone."""
    key = pd.Series([None if (k := file_number(p)) is None else f"{lab}|{(k - 1) // block_size}"
                     for p, lab in zip(paths, labels)])
    edges = []
    for idx in key.dropna().groupby(key.dropna()).groups.values():
        idx = np.asarray(idx)
        edges.extend(zip(idx[:-1], idx[1:]))
    return np.array(edges, int).reshape(-1, 2)


def assign_groups(df: pd.DataFrame, protocol: str, block_size: int,
                  pairs: pd.DataFrame) -> pd.Series:
    """Each image's group, named by its first member's path: near-duplicate clusters, unioned
    with acquisition blocks under ``acquisition-blocks``; every image alone under ``image-level``."""
    if protocol == "image-level":
        return df["path"].copy()
    edges = pairs[["i", "j"]].to_numpy()
    if protocol == "acquisition-blocks":
        edges = np.concatenate([edges, block_edges(df["path"], df["label"], block_size)])
    comp = components(len(df), edges)
    first = pd.Series(df["path"].to_numpy()).groupby(comp).transform("min")
    return pd.Series(first.to_numpy(), index=df.index)


def cross_split_pairs(df: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """The linked pairs whose two images sit in different splits, with their paths, splits and how
    the second was made from the first (:func:`transform_name`)."""
    split = df["split"].to_numpy()
    cross = pairs[split[pairs["i"].to_numpy()] != split[pairs["j"].to_numpy()]] if len(pairs) else pairs
    paths = df["path"].to_numpy()
    return pd.DataFrame({"a": paths[cross["i"].to_numpy()], "b": paths[cross["j"].to_numpy()],
                         "split_a": split[cross["i"].to_numpy()], "split_b": split[cross["j"].to_numpy()],
                         "ncc": cross["ncc"].to_numpy(), "hash_bits": cross["hash_bits"].to_numpy(),
                         "transform": [transform_name(g) for g in cross["transform"]]})


def turned_counts(pairs: pd.DataFrame) -> dict[str, int]:
    """How many linked pairs are turned or mirrored copies, by symmetry name (none: ``{}``)."""
    g = pairs["transform"].to_numpy(int)
    values, counts = np.unique(g[g != 0], return_counts=True)
    return {transform_name(int(v)): int(n) for v, n in zip(values, counts)}


def cluster_sizes(groups: pd.Series) -> dict[int, int]:
    """Histogram of group sizes: {size: number of groups of that size}."""
    counts = groups.value_counts().value_counts().sort_index()
    return {int(k): int(v) for k, v in counts.items()}
