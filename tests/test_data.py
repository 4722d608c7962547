"""gatelab.data: corpus splits, tokenizer, resumable batches, images, series, synthetic
generators and the file loaders (on small files written here)."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import numpy as np
import pytest
import torch

from gatelab.data import (
    DOMAINS,
    EOS,
    IGNORE_INDEX,
    ByteTokenizer,
    EvalBatches,
    LMBatches,
    code_documents,
    extract_patches,
    forecast_windows,
    gaussian_moe,
    load_cifar10,
    load_corpus,
    load_emnist,
    load_fashion_mnist,
    load_mnist,
    mmoe_synthetic,
    mqar,
    prose_documents,
    read_idx,
    rotate,
)
from gatelab.data._optional import require
from gatelab.data.synthetic import GaussianMoEParams

# -- text ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(seed=0)


def test_corpus_split_is_deterministic_disjoint_and_complete(corpus):
    fresh = load_corpus.__wrapped__(seed=0)  # rebuilt, not the cached object
    assert [d.name for d in fresh.train] == [d.name for d in corpus.train]
    assert [d.name for d in fresh.val] == [d.name for d in corpus.val]
    train, val = {d.name for d in corpus.train}, {d.name for d in corpus.val}
    assert not train & val
    everything = {d.name for d in prose_documents() + code_documents()}
    assert train | val == everything
    for split in ("train", "val"):
        for dom in DOMAINS:
            assert corpus.documents(split, dom), (split, dom)
    other = load_corpus.__wrapped__(seed=1)
    assert {d.name for d in other.val} != val


def test_corpus_contents_and_sizes(corpus):
    stats = corpus.stats()
    prose = prose_documents()
    assert len(prose) > 50 and all(d.domain == "prose" for d in prose)
    assert stats["train"]["prose"]["bytes"] + stats["val"]["prose"]["bytes"] == sum(
        len(d.data) for d in prose
    )
    code = code_documents()
    names = [d.name for d in code]
    assert names == sorted(names) and "stdlib:abc.py" in names
    assert not any("pydoc_data" in n or "site-packages" in n for n in names)
    assert sum(len(d.data) for d in code) > 1_000_000
    for dom in DOMAINS:  # validation holds about 10% of each domain's bytes
        total = stats["train"][dom]["bytes"] + stats["val"][dom]["bytes"]
        assert 0.02 < stats["val"][dom]["bytes"] / total <= 0.1


@pytest.mark.parametrize(
    "text", ["", "plain ascii\n", "héllo wörld — naïve café", "日本語のテキスト 🎉🐍", "\x00\x7f\t"]
)
def test_tokenizer_round_trips(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == torch.long and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, dtype=torch.uint8)) == text
    assert tok.decode(tok.encode(text.encode("utf-8"))) == text
    with_eos = tok.encode(text, add_eos=True)
    assert int(with_eos[-1]) == EOS == tok.eos_id and tok.decode(with_eos) == text


def test_tokenizer_bad_input():
    tok = ByteTokenizer()
    assert tok.vocab_size == 257
    with pytest.raises(ValueError, match="token ids"):
        tok.decode([65, 300])
    with pytest.raises(ValueError, match="uint8"):
        tok.encode("a", add_eos=True, dtype=torch.uint8)
    with pytest.raises(TypeError):
        tok.encode(123)
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # a cut character decodes, replaced


def test_stream_layout(corpus):
    ids, doms = corpus.stream("val", "prose")
    docs = corpus.documents("val", "prose")
    assert int(ids[0]) == EOS and int(ids[-1]) == EOS
    assert int((ids == EOS).sum()) == len(docs) + 1
    assert len(ids) == 1 + sum(len(d.data) + 1 for d in docs)
    assert bool((doms == DOMAINS.index("prose")).all())
    tok = ByteTokenizer()
    ends = torch.nonzero(ids == EOS).squeeze(1).tolist()
    assert tok.decode(ids[ends[0] + 1 : ends[1]]) == docs[0].data.decode()
    _, both = corpus.stream("val")
    assert set(both.unique().tolist()) == {0, 1}


def test_lm_batches_shapes_and_determinism(corpus):
    a = LMBatches(corpus, "train", seq_len=64, batch_size=4, seed=3)
    b = LMBatches(corpus, "train", seq_len=64, batch_size=4, seed=3)
    for _ in range(3):
        x, y, d = next(a)
        x2, y2, d2 = next(b)
        assert x.shape == y.shape == d.shape == (4, 64)
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(d, d2)
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert x.dtype == torch.long and int(y.max()) <= EOS and set(d.unique().tolist()) <= {0, 1}
    c = next(LMBatches(corpus, "train", seq_len=64, batch_size=4, seed=4))
    assert not torch.equal(c.inputs, x)


def test_lm_batches_resume_equals_uninterrupted_run(corpus):
    # A small split and long windows so that the run crosses several epochs.
    kw = dict(seq_len=2048, batch_size=7, seed=11, domain="prose")
    full = LMBatches(corpus, "val", **kw)
    assert full.windows_per_epoch < 30
    reference = [next(full) for _ in range(12)]

    first = LMBatches(corpus, "val", **kw)
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = LMBatches(corpus, "val", **kw)
    resumed.load_state_dict(state)
    for want in reference[5:]:
        got = next(resumed)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)

    # Within one epoch each window is visited once.
    one = LMBatches(corpus, "val", seq_len=2048, batch_size=1, seed=11, domain="prose")
    firsts = [tuple(next(one).inputs[0, :16].tolist()) for _ in range(one.windows_per_epoch)]
    assert len(set(firsts)) == len(firsts)

    with pytest.raises(ValueError, match="seq_len"):
        LMBatches(
            corpus, "val", seq_len=1024, batch_size=7, seed=11, domain="prose"
        ).load_state_dict(state)


def test_eval_batches_cover_every_target_once(corpus):
    for dom in DOMAINS:
        ids, _ = corpus.stream("val", dom)
        ev = EvalBatches(corpus, "val", seq_len=500, batch_size=16, domain=dom)
        batches = list(ev)
        assert len(batches) == len(ev)
        targets = torch.cat([b.targets.reshape(-1) for b in batches])
        doms = torch.cat([b.domains.reshape(-1) for b in batches])
        keep = targets != IGNORE_INDEX
        assert torch.equal(targets[keep], ids[1:].long())
        assert bool((doms[keep] == DOMAINS.index(dom)).all()) and bool((doms[~keep] == -1).all())
        n_bytes = sum(len(d.data) + 1 for d in corpus.documents("val", dom))
        assert int(keep.sum()) == n_bytes
        again = list(EvalBatches(corpus, "val", seq_len=500, batch_size=16, domain=dom))
        assert all(torch.equal(a.inputs, b.inputs) for a, b in zip(again, batches, strict=True))
    assert len(EvalBatches(corpus, "val", seq_len=64, batch_size=4, max_batches=3)) == 3


# -- images --------------------------------------------------------------------------------


def test_digits_splits():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits as sk_digits

    from gatelab.data import load_digits

    splits = load_digits(seed=0)
    assert {k: len(v.labels) for k, v in splits.items()} == {"train": 1259, "val": 179, "test": 359}
    for s in splits.values():
        assert s.images.shape[1:] == (1, 8, 8) and s.images.dtype == torch.float32
        assert float(s.images.min()) >= 0 and float(s.images.max()) <= 1
        assert s.labels.bincount().tolist().count(0) == 0  # every class in every split

    def rows(images, labels):
        return Counter(
            zip(map(tuple, images.reshape(len(labels), -1).tolist()), labels.tolist(), strict=True)
        )

    x, y = sk_digits(return_X_y=True)
    whole = rows(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    parts = sum((rows(*s) for s in splits.values()), Counter())
    assert parts == whole  # the three splits partition the dataset
    again = load_digits(seed=0)
    assert all(torch.equal(again[k].images, splits[k].images) for k in splits)
    other = load_digits(seed=1)
    assert not torch.equal(other["val"].images, splits["val"].images)


def test_rotate():
    x = torch.rand(6, 1, 8, 8)
    assert torch.equal(rotate(x, 0), x)
    assert torch.equal(rotate(x, 360), x)
    torch.testing.assert_close(rotate(x, 90), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-6, rtol=0)
    torch.testing.assert_close(rotate(x, -90), torch.rot90(x, -1, dims=(-2, -1)), atol=1e-6, rtol=0)
    rect = torch.rand(2, 3, 5, 7)
    torch.testing.assert_close(
        rotate(rect, 180), torch.rot90(rect, 2, dims=(-2, -1)), atol=1e-6, rtol=0
    )
    angles = torch.tensor([0.0, 90.0, 180.0, 270.0, 450.0, -180.0])
    want = torch.stack(
        [torch.rot90(x[i], int(a) // 90, dims=(-2, -1)) for i, a in enumerate(angles)]
    )
    torch.testing.assert_close(rotate(x, angles), want, atol=1e-6, rtol=0)
    # Any angle: the centre pixel of an odd-sized image stays; mass moves to the rotated spot.
    odd = torch.zeros(1, 1, 9, 9)
    odd[0, 0, 4, 4] = 1.0
    assert float(rotate(odd, 33.0)[0, 0, 4, 4]) == pytest.approx(1.0)
    assert rotate(x, 45.0, mode="nearest").shape == x.shape
    with pytest.raises(ValueError, match="angle"):
        rotate(x, torch.zeros(3))


def test_patches():
    img = torch.arange(2 * 3 * 10 * 12, dtype=torch.float32).reshape(2, 3, 10, 12)
    p = extract_patches(img, 4, 3)
    assert p.shape == (2 * 3 * 3, 3, 4, 4)
    assert torch.equal(p[1], img[0, :, 0:4, 3:7]) and torch.equal(p[-1], img[1, :, 6:10, 6:10])
    assert extract_patches(img[0], 5).shape == (2 * 2, 3, 5, 5)
    with pytest.raises(ValueError, match="larger"):
        extract_patches(img, 11)

    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    from gatelab.data import load_photo, photo_patches

    cam = load_photo("camera")
    assert cam.shape == (1, 512, 512) and 0 <= float(cam.min()) <= float(cam.max()) <= 1
    patches = photo_patches(32, 16, names=["camera", "china"], channels=1)
    assert patches.shape == (31 * 31 + 25 * 39, 1, 32, 32)
    assert load_photo("astronaut", channels=1).shape == (1, 512, 512)
    assert load_photo("flower", channels=3).shape == (3, 427, 640)
    with pytest.raises(ValueError, match="unknown photograph"):
        load_photo("no_such_photo")


# -- series --------------------------------------------------------------------------------


def _check_windows(data, lookback, horizon):
    window = lookback + horizon
    for part, (lo, hi) in zip(
        (data.train, data.val, data.test),
        zip(data.bounds[:3], data.bounds[1:], strict=True),
        strict=True,
    ):
        assert len(part.starts)
        assert int(part.starts.min()) >= lo and int(part.starts.max()) + window <= hi
        norm = ((data.values - data.mean.double()) / data.std.double()).float()
        i = len(part.starts) // 2
        s = int(part.starts[i])
        torch.testing.assert_close(part.inputs[i], norm[s : s + lookback])
        torch.testing.assert_close(part.targets[i], norm[s + lookback : s + window])


def test_series_windows_stay_in_their_split():
    pytest.importorskip("statsmodels")
    from gatelab.data import SERIES_NAMES

    for name in SERIES_NAMES:
        data = forecast_windows(name, 8, 4)
        _check_windows(data, 8, 4)
        assert not bool(data.values.isnan().any())
        t1 = data.bounds[1]
        torch.testing.assert_close(data.mean, data.values[:t1].mean(0).float())
    macro = forecast_windows("macrodata", 6, 2, columns=["realgdp", "cpi"])
    assert macro.train.inputs.shape[1:] == (6, 2) and macro.columns == ["realgdp", "cpi"]
    with pytest.raises(ValueError, match="fewer than lookback"):
        forecast_windows("nile", 12, 6)


def test_series_normalisation_and_filling_use_their_part_only():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(100, 2, generator=gen, dtype=torch.float64)
    values[69, 0] = float("nan")  # last train step: filled from train, not from val
    values[70, 0] = 1000.0
    values[40, 1] = float("nan")
    base = forecast_windows(values, 5, 3)
    _check_windows(base, 5, 3)
    assert float(base.values[69, 0]) == float(values[68, 0])
    assert float(base.values[40, 1]) == pytest.approx(float(values[39:42:2, 1].mean()))
    changed = values.clone()
    changed[70:] *= 50.0  # val and test change; train statistics and windows must not
    other = forecast_windows(changed, 5, 3)
    assert torch.equal(other.mean, base.mean) and torch.equal(other.std, base.std)
    assert torch.equal(other.train.inputs, base.train.inputs)
    assert not torch.equal(other.test.inputs, base.test.inputs)
    torch.testing.assert_close(
        base.denormalize(base.train.inputs[0]).double(), base.values[:5], atol=1e-5, rtol=1e-6
    )


# -- synthetic -----------------------------------------------------------------------------


def test_mqar():
    a = mqar(200, vocab_size=256, seq_len=64, num_kv_pairs=8, seed=1)
    b = mqar(200, vocab_size=256, seq_len=64, num_kv_pairs=8, seed=1)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(
        mqar(200, vocab_size=256, seq_len=64, num_kv_pairs=8, seed=2).inputs, a.inputs
    )
    assert a.inputs.shape == a.labels.shape == (200, 64)
    queries = a.labels != IGNORE_INDEX
    assert bool((queries.sum(1) == 8).all())
    for row in range(20):
        context = a.inputs[row, :16].tolist()
        keys, values = context[0::2], context[1::2]
        assert len(set(keys)) == 8 and all(1 <= k < 128 for k in keys)
        assert all(128 <= v < 256 for v in values)
        pairs = dict(zip(keys, values, strict=True))
        for t in torch.nonzero(queries[row]).squeeze(1).tolist():
            assert t >= 16 and t % 2 == 0
            assert pairs[int(a.inputs[row, t])] == int(a.labels[row, t])
    plain = mqar(50, vocab_size=256, seq_len=64, num_kv_pairs=8, random_non_queries=False)
    assert int((plain.inputs == 0).sum()) == 50 * (64 - 16 - 8)
    # power law: with a = 0.01 queries crowd near the context, with a = 1 they spread out
    near = mqar(500, vocab_size=512, seq_len=256, num_kv_pairs=4, power_a=0.01, seed=0)
    flat = mqar(500, vocab_size=512, seq_len=256, num_kv_pairs=4, power_a=1.0, seed=0)
    mean_pos = [
        float(torch.nonzero(d.labels != IGNORE_INDEX)[:, 1].float().mean()) for d in (near, flat)
    ]
    assert mean_pos[0] < mean_pos[1] - 20
    with pytest.raises(ValueError, match="even"):
        mqar(1, seq_len=63)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        mqar(1, vocab_size=256, seq_len=64, num_kv_pairs=17)


def test_gaussian_moe():
    a = gaussian_moe(4000, dim=3, num_experts=4, seed=5)
    b = gaussian_moe(4000, dim=3, num_experts=4, seed=5)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.experts, b.experts)
    p = a.params
    assert a.x.shape == (4000, 3) and a.y.shape == (4000,) and p.beta1.shape == (4, 3)
    assert bool((p.beta1[-1] == 0).all()) and float(p.beta0[-1]) == 0
    gate = p.gate(a.x)
    torch.testing.assert_close(gate.sum(1), torch.ones(4000))
    freq = torch.bincount(a.experts, minlength=4).float() / 4000
    torch.testing.assert_close(freq, gate.mean(0), atol=0.03, rtol=0)
    resid = a.y - (a.x * p.a[a.experts]).sum(1) - p.b[a.experts]
    assert float(resid.std()) == pytest.approx(0.5, rel=0.1)
    assert bool(torch.isfinite(p.log_prob(a.x, a.y)).all())
    # Same ground truth, another sample.
    c = gaussian_moe(100, params=p, seed=6)
    assert c.params is p and not torch.equal(c.x, a.x[:100])
    sparse = GaussianMoEParams.random(3, 4, seed=5, top_k=2)
    assert bool(((sparse.gate(a.x) > 0).sum(1) == 2).all())
    with pytest.raises(ValueError, match="top_k"):
        GaussianMoEParams.random(3, 4, top_k=5)


def test_mmoe_correlation_tracks_p():
    low = mmoe_synthetic(5000, correlation=0.1, dim=100, seed=0)
    high = mmoe_synthetic(5000, correlation=0.9, dim=100, seed=0)
    again = mmoe_synthetic(5000, correlation=0.9, dim=100, seed=0)
    assert torch.equal(high.x, again.x) and torch.equal(high.y, again.y)
    assert torch.equal(low.x, high.x)  # paired across p
    assert high.y.shape == (5000, 2)
    w1, w2 = high.weights.double()
    assert float(w1 @ w2) == pytest.approx(0.9, abs=1e-5) and float(w1.norm()) == pytest.approx(1.0)

    def corr(d):
        return float(torch.corrcoef(d.y.T)[0, 1])

    assert corr(high) > corr(low) + 0.4
    assert corr(mmoe_synthetic(5000, correlation=1.0, seed=0)) > 0.95
    with pytest.raises(ValueError, match="correlation"):
        mmoe_synthetic(10, correlation=1.5)


# -- loaders -------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    code = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}[
        array.dtype.type
    ]
    header = bytes([0, 0, code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_mnist(root, prefix, n, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
        path = root / f"{prefix}-{kind}-ubyte{'.gz' if gz else ''}"
        data = _idx_bytes(arr)
        path.write_bytes(gzip.compress(data) if gz else data)
    return images, labels


def test_read_idx_types(tmp_path):
    for arr in (
        np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5,
        np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
        np.array([-3, 7], dtype=np.int16),
    ):
        path = tmp_path / "x.idx"
        path.write_bytes(_idx_bytes(arr))
        np.testing.assert_array_equal(read_idx(path).numpy(), arr)


def test_mnist_family(tmp_path):
    images, labels = _write_mnist(tmp_path, "train", 5)
    test_images, _ = _write_mnist(tmp_path, "t10k", 3, gz=True, seed=1)
    train = load_mnist(tmp_path, "train")
    assert train.images.shape == (5, 1, 28, 28) and train.images.dtype == torch.uint8
    assert np.array_equal(train.images[:, 0].numpy(), images)
    assert train.labels.tolist() == labels.tolist() and train.labels.dtype == torch.int64
    assert np.array_equal(load_fashion_mnist(tmp_path, "test").images[:, 0].numpy(), test_images)

    _write_mnist(tmp_path, "emnist-letters-train", 4)
    (tmp_path / "emnist-letters-train-labels-idx1-ubyte").write_bytes(
        _idx_bytes(np.array([1, 26, 0, 5], np.uint8))
    )
    # letters are 1..26: 0 is out of range for this subset
    with pytest.raises(ValueError, match="outside"):
        load_emnist(tmp_path, "letters", "train")
    (tmp_path / "emnist-letters-train-labels-idx1-ubyte").write_bytes(
        _idx_bytes(np.array([1, 26, 3, 5], np.uint8))
    )
    assert load_emnist(tmp_path, "letters", "train").labels.tolist() == [1, 26, 3, 5]
    em_images, _ = _write_mnist(tmp_path, "emnist-digits-train", 4, gz=True)
    emnist = load_emnist(tmp_path, "digits", "train")
    assert np.array_equal(emnist.images[:, 0].numpy(), em_images.transpose(0, 2, 1))
    raw = load_emnist(tmp_path, "digits", "train", transpose=False)
    assert np.array_equal(raw.images[:, 0].numpy(), em_images)


def test_idx_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(tmp_path, "test")
    message = str(info.value)
    assert str(tmp_path / "t10k-images-idx3-ubyte") in message
    assert "t10k-labels-idx1-ubyte" in message and ".gz" in message and "https://" in message

    _write_mnist(tmp_path, "train", 4)
    images_path = tmp_path / "train-images-idx3-ubyte"
    good = images_path.read_bytes()
    images_path.write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(ValueError, match="magic"):
        load_mnist(tmp_path)
    images_path.write_bytes(good[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_mnist(tmp_path)
    images_path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_mnist(tmp_path)
    images_path.unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="gzip"):
        load_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(good))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(ValueError, match="4 images but"):
        load_mnist(tmp_path)


def _cifar_file(path, labels, seed):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    records = np.concatenate([np.array(labels, np.uint8)[:, None], pixels], axis=1)
    path.write_bytes(records.tobytes())
    return pixels.reshape(-1, 3, 32, 32)


def test_cifar10(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    pixels = [_cifar_file(folder / f"data_batch_{i}.bin", [i, 9 - i], i) for i in range(1, 6)]
    test_pixels = _cifar_file(folder / "test_batch.bin", [3, 1, 4], 0)
    train = load_cifar10(tmp_path, "train")  # finds the extracted folder below root
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [1, 8, 2, 7, 3, 6, 4, 5, 5, 4]
    assert np.array_equal(train.images.numpy(), np.concatenate(pixels))
    test = load_cifar10(folder, "test")
    assert test.labels.tolist() == [3, 1, 4] and np.array_equal(test.images.numpy(), test_pixels)
    # channel planes: the first 1024 pixel bytes are the red plane, row-major
    assert np.array_equal(test.images[0, 0].numpy().reshape(-1), test_pixels[0, 0].reshape(-1))

    (folder / "test_batch.bin").write_bytes((folder / "test_batch.bin").read_bytes()[:-1])
    with pytest.raises(ValueError, match="3073"):
        load_cifar10(folder, "test")
    _cifar_file(folder / "test_batch.bin", [12], 0)
    with pytest.raises(ValueError, match="label 12"):
        load_cifar10(folder, "test")

    (folder / "data_batch_3.bin").unlink()
    (folder / "data_batch_3").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError) as info:
        load_cifar10(tmp_path, "train")
    message = str(info.value)
    assert str(folder / "data_batch_3.bin") in message and "data_batch_1.bin" not in message
    assert "cifar-10-binary.tar.gz" in message and "pickled" in message
    with pytest.raises(FileNotFoundError, match="test_batch.bin"):
        load_cifar10(tmp_path / "elsewhere", "test")


def test_optional_import_message():
    with pytest.raises(ImportError, match=r"pip install 'gatelab\[data\]'"):
        require("gatelab_no_such_module.sub", "this test")


def test_tensor_batches_resume_and_cover_each_epoch():
    from gatelab.data import TensorBatches

    x, y = torch.arange(10).float().unsqueeze(1), torch.arange(10)
    whole = TensorBatches(x, y, batch_size=4, seed=3)
    batches = [next(whole) for _ in range(6)]
    assert sorted(torch.cat([b[1] for b in batches[:2]] + [batches[2][1][:2]]).tolist()) == list(
        range(10)
    )
    part = TensorBatches(x, y, batch_size=4, seed=3)
    for _ in range(2):
        next(part)
    resumed = TensorBatches(x, y, batch_size=4, seed=3)
    resumed.load_state_dict(part.state_dict())
    for expected in batches[2:]:
        got = next(resumed)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with pytest.raises(ValueError, match="seed"):
        TensorBatches(x, y, batch_size=4, seed=4).load_state_dict(part.state_dict())
