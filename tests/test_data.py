"""The data pipeline: FIM layout and rate, lossless packing, the store, and the resumable,
rank-sharded loader; bad input fails with one sentence and leaves nothing half-written."""
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest
from tokenizers import Tokenizer

from dsv3.data.config import DataConfig
from dsv3.data.fim import encode_documents, fim_plan
from dsv3.data.loader import FeistelPermutation, TokenLoader
from dsv3.data import prepare as prepare_module
from dsv3.data.prepare import open_store, store_path
from dsv3.data.store import SplitStream, SplitWriter, TokenStore
from dsv3.data.synthetic import SyntheticLoader
from dsv3.data.tokenizer import special_ids, tokenizer_sha256, train_bpe

TEXTS = [f"def function_{i}(x):\n    return x * {i} + {i % 7}  # comment {i}\n" * (1 + i % 5) for i in range(200)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(TEXTS, vocab_size=300)


@pytest.fixture
def corpus(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    for i, text in enumerate(TEXTS[:60]):
        (folder / ("sub" if i % 2 else ".") / f"doc{i:03d}.txt").write_text(text)
    return folder


def data_cfg(tmp_path, **overrides) -> DataConfig:
    fields = dict(source=str(tmp_path / "corpus"), vocab_size=300, num_proc=1, seq_len=16,
                  cache_dir=str(tmp_path / "cache"), validation_fraction=0.1)
    return DataConfig(**{**fields, **overrides})


# --- FIM ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spm", [False, True])
def test_fim_layout_and_sentinel_order(tokenizer, spm):
    special = special_ids(tokenizer, "test")
    docs, flags = encode_documents(TEXTS[:50], list(range(50)), tokenizer, special, seed=1,
                                   fim_rate=1.0, spm_rate=1.0 if spm else 0.0)
    assert all(flags)
    for text, tokens in zip(TEXTS[:50], docs):
        assert tokens[-1] == special.eos and tokens.count(special.eos) == 1
        for sentinel in (special.fim_begin, special.fim_hole, special.fim_end):
            assert tokens.count(sentinel) == 1
        begin, hole, end = (tokens.index(s) for s in (special.fim_begin, special.fim_hole, special.fim_end))
        assert begin == 0 and begin < hole < end
        if spm:  # <begin><hole> suffix <end> prefix+middle <eos>
            assert hole == 1
            suffix, prefix_middle = tokens[hole + 1:end], tokens[end + 1:-1]
            assert tokenizer.decode(prefix_middle) + tokenizer.decode(suffix) == text
        else:  # <begin> prefix <hole> suffix <end> middle <eos>
            prefix, suffix, middle = tokens[1:hole], tokens[hole + 1:end], tokens[end + 1:-1]
            assert tokenizer.decode(prefix) + tokenizer.decode(middle) + tokenizer.decode(suffix) == text


def test_fim_rate_is_observed_and_plans_are_per_document():
    plans = [fim_plan("x" * 100, seed=3, index=i, fim_rate=0.1, spm_rate=0.5) for i in range(20000)]
    rate = sum(p is not None for p in plans) / len(plans)
    assert 0.1 - 0.007 < rate < 0.1 + 0.007  # 3.3 sigma for 20000 Bernoulli(0.1) draws
    spm = [p[2] for p in plans if p is not None]
    assert 0.45 < sum(spm) / len(spm) < 0.55
    assert all(0 <= p[0] <= p[1] <= 100 for p in plans if p is not None)
    assert fim_plan("x" * 100, 3, 17, 0.1, 0.5) == plans[17]  # a function of (seed, index) only


def test_plain_documents_end_in_eos(tokenizer):
    special = special_ids(tokenizer, "test")
    docs, flags = encode_documents(TEXTS[:5], list(range(5)), tokenizer, special, seed=0, fim_rate=0.0, spm_rate=0.0)
    assert not any(flags)
    for text, tokens in zip(TEXTS, docs):
        assert tokens == tokenizer.encode(text, add_special_tokens=False).ids + [special.eos]


# --- Packing and the store ---------------------------------------------------------------------

def test_split_writer_packs_across_shards_without_loss(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, size=rng.integers(1, 20)) for _ in range(50)]
    writer = SplitWriter(tmp_path, "train", shard_tokens=7)
    for first in range(0, 50, 8):  # several write calls, documents straddling shards
        batch = docs[first:first + 8]
        writer.write(np.concatenate(batch), np.array([len(d) for d in batch]))
    meta = writer.close()
    stream = SplitStream(tmp_path, "train", meta)
    expected = np.concatenate(docs)
    assert len(meta["shards"]) == -(-len(expected) // 7)
    np.testing.assert_array_equal(stream.read(0, stream.n_tokens), expected)
    np.testing.assert_array_equal(stream.read(5, 23), expected[5:23])
    starts = stream.document_starts
    assert list(np.diff(starts)) == [len(d) for d in docs] and starts[-1] == len(expected)


def test_prepared_store_holds_every_document_once(tmp_path, corpus):
    cfg = data_cfg(tmp_path, fim_rate=0.0)
    store = open_store(cfg, seed=0)
    tokenizer = Tokenizer.from_file(str(store.path / "tokenizer.json"))
    eos = store.meta["special_ids"]["eos"]
    texts = {str(p.relative_to(corpus)): p.read_text() for p in sorted(corpus.rglob("*.txt"))}
    seen = []
    for name in ("train", "validation"):
        split = store.split(name)
        stream = split.read(0, split.n_tokens)
        starts = split.document_starts
        docs = [stream[a:b] for a, b in zip(starts[:-1], starts[1:])]
        assert all(d[-1] == eos for d in docs)
        seen += [tokenizer.decode(d[:-1].tolist()) for d in docs]
        assert store.meta["splits"][name]["bytes"] == sum(len(tokenizer.decode(d[:-1].tolist()).encode()) for d in docs)
    assert sorted(seen) == sorted(texts.values())  # nothing lost, nothing duplicated
    assert 0 < store.meta["splits"]["validation"]["documents"] < len(texts)


def test_prepare_logs_bpe_and_tokenisation_progress_and_parts_change_nothing(tmp_path, corpus, monkeypatch, caplog):
    whole = open_store(data_cfg(tmp_path, fim_rate=0.5, cache_dir=str(tmp_path / "whole")), seed=0)
    monkeypatch.setattr(prepare_module, "PROGRESS_BYTES", 1000)  # the 60 documents hold about 4 KB
    caplog.set_level(logging.INFO, logger="dsv3.data")
    parts = open_store(data_cfg(tmp_path, fim_rate=0.5, cache_dir=str(tmp_path / "parts")), seed=0)
    messages = [r.getMessage() for r in caplog.records]
    assert any(re.fullmatch(r"trained a byte-level BPE of 300 tokens on 0\.0 MB of text in [0-9.]+ s", m)
               for m in messages)
    assert "tokenizing 60 documents (0.0 MB), data.num_proc=1" in messages
    progress = [m for m in messages if m.startswith("tokenized ")]
    assert len(progress) >= 3 and progress[-1].startswith("tokenized 0.0 of 0.0 MB (100%) in ")
    for name in ("train", "validation"):  # FIM plans follow the document's index in the whole dataset
        a, b = whole.split(name), parts.split(name)
        np.testing.assert_array_equal(a.read(0, a.n_tokens), b.read(0, b.n_tokens))
    assert whole.meta["splits"] == parts.meta["splits"]


def test_store_is_cached_and_keyed_by_its_settings(tmp_path, corpus):
    cfg = data_cfg(tmp_path)
    first = open_store(cfg, seed=0)
    assert open_store(cfg, seed=0).path == first.path  # found again, not rebuilt
    assert store_path(data_cfg(tmp_path, fim_rate=0.5), seed=0) != first.path
    assert store_path(cfg, seed=1) != first.path
    assert [p.name for p in Path(cfg.cache_dir).iterdir()] == [first.path.name]  # no temporary left


def test_given_tokenizer_json_is_used_unchanged(tmp_path, corpus, tokenizer):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    store = open_store(data_cfg(tmp_path, tokenizer=str(path)), seed=0)
    assert store.vocab_size == tokenizer.get_vocab_size()
    assert Tokenizer.from_file(str(store.path / "tokenizer.json")).to_str() == tokenizer.to_str()
    assert store.tokenizer_sha256 == tokenizer_sha256(tokenizer)


def test_jsonl_source_reads_the_text_field(tmp_path):
    file = tmp_path / "rows.jsonl"
    file.write_text("".join(json.dumps({"content": t, "id": i}) + "\n" for i, t in enumerate(TEXTS[:40])))
    store = open_store(data_cfg(tmp_path, source=str(file), text_field="content"), seed=0)
    assert sum(s["documents"] for s in store.meta["splits"].values()) == 40
    with pytest.raises(ValueError, match="data.text_field='text' is not a field of .*rows.jsonl line 1 "
                                         r"\(its fields: content, id\).$"):
        open_store(data_cfg(tmp_path, source=str(file), cache_dir=str(tmp_path / "other")), seed=0)


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.json", "rows.parquet"])
def test_table_file_with_the_default_text_field_prepares_and_trains(tmp_path, name):
    file, rows = tmp_path / name, [{"id": i, "text": t} for i, t in enumerate(TEXTS[:40])]
    if name.endswith(".jsonl"):
        file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif name.endswith(".json"):  # one array of rows
        file.write_text(json.dumps(rows, indent=1))
    else:
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), file)
    store = open_store(data_cfg(tmp_path, source=str(file)), seed=0)
    assert sum(s["documents"] for s in store.meta["splits"].values()) == 40
    assert TokenLoader(store.split("train"), seq_len=16, seed=0).next_batch(2).shape == (2, 17)


def test_stdlib_corpus_splits_by_file(tmp_path):
    cfg = DataConfig(source="stdlib", vocab_size=300, num_proc=2, max_documents=60, cache_dir=str(tmp_path),
                     validation_fraction=0.1)
    store = open_store(cfg, seed=0)
    splits = store.meta["splits"]
    assert splits["train"]["documents"] + splits["validation"]["documents"] <= 60
    assert splits["validation"]["documents"] > 0 and splits["validation"]["fim_documents"] == 0


# --- Bad input ---------------------------------------------------------------------------------

def test_missing_path_fails_with_one_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^data.source=.*nowhere: no such file or folder.$"):
        open_store(data_cfg(tmp_path, source=str(tmp_path / "nowhere")), seed=0)


def test_empty_corpus_fails(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"data.source=.*corpus holds no non-empty documents."):
        open_store(data_cfg(tmp_path), seed=0)


BAD_JSONL = {  # the second line of rows.jsonl -> what the error says
    '{"body": "b"}': r"^data.text_field='text' is not a field of .*rows.jsonl line 2 \(its fields: body\).$",
    '{"text": null}': r"^data.text_field='text' of .*rows.jsonl line 2 is null, not a string.$",
    '{"text": 3}': r"^data.text_field='text' of .*rows.jsonl line 2 is 3, not a string.$",
    '{"text": "b"': r"^data.source=.*rows.jsonl: .*rows.jsonl line 2 is not valid JSON: Expecting ',' delimiter.$",
    '["b"]': r"^data.source=.*rows.jsonl: .*rows.jsonl line 2 is not a JSON object.$",
}


@pytest.mark.parametrize("line", BAD_JSONL)
def test_bad_jsonl_row_is_named_by_file_and_line(tmp_path, line):
    file = tmp_path / "rows.jsonl"
    file.write_text('{"text": "a"}\n' + line + '\n{"text": "c"}\n')
    cfg = data_cfg(tmp_path, source=str(file))
    with pytest.raises(ValueError, match=BAD_JSONL[line]):
        open_store(cfg, seed=0)
    assert not Path(cfg.cache_dir).exists()


def test_bad_parquet_is_named(tmp_path):
    (tmp_path / "corpus").mkdir()
    good = tmp_path / "corpus" / "a.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"text": TEXTS[:20]}), good)
    (tmp_path / "corpus" / "b.parquet").write_bytes(good.read_bytes()[:-100])  # truncated
    with pytest.raises(ValueError, match=r"^data.source=.*corpus: .*b.parquet is not a readable Parquet file: "):
        open_store(data_cfg(tmp_path), seed=0)
    (tmp_path / "corpus" / "b.parquet").unlink()
    pyarrow.parquet.write_table(pyarrow.table({"text": list(range(20))}), good)
    with pytest.raises(ValueError, match=r"^data.text_field='text' of .*corpus holds int64 values, not strings.$"):
        open_store(data_cfg(tmp_path), seed=0)


@pytest.mark.parametrize("target, reason", [
    ("nowhere.txt", "No such file or directory"),  # a dangling link
    pytest.param("/proc/self/mem", "Input/output error",  # reading offset 0 of one's own memory fails
                 marks=pytest.mark.skipif(not Path("/proc/self/mem").is_file(), reason="needs Linux /proc")),
])
def test_unreadable_file_is_named(tmp_path, corpus, target, reason):
    (corpus / "sub" / "bad.txt").symlink_to(target)
    cfg = data_cfg(tmp_path)
    with pytest.raises(ValueError, match=rf"^data.source=.*corpus: cannot read .*corpus/sub/bad.txt: {reason}.$"):
        open_store(cfg, seed=0)
    assert not Path(cfg.cache_dir).exists()


def test_binary_file_is_refused_unless_allowed(tmp_path, corpus):
    (corpus / "image.txt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"^data.source=.*corpus: .*image.txt holds NUL bytes, so it is binary "
                                         r"rather than text; remove it, or set data.allow_binary=true"):
        open_store(data_cfg(tmp_path), seed=0)
    store = open_store(data_cfg(tmp_path, allow_binary=True), seed=0)
    assert store.meta["replaced_bytes"] == 128 * 4  # bytes 0x80-0xff are never valid UTF-8 alone


def test_undecodable_bytes_are_replaced_and_counted(tmp_path, corpus):
    (corpus / "latin1.txt").write_bytes("café olé\n".encode("latin-1") * 3)
    store = open_store(data_cfg(tmp_path), seed=0)
    assert store.meta["replaced_bytes"] == 6  # two bad bytes a line, three lines


def test_store_made_with_another_tokenizer_is_refused(tmp_path, corpus, tokenizer):
    store = open_store(data_cfg(tmp_path), seed=0)  # a BPE trained on the corpus
    other = tmp_path / "other.json"
    tokenizer.save(str(other))
    with pytest.raises(ValueError, match="was made with a different tokenizer than data.tokenizer="):
        open_store(data_cfg(tmp_path, store=str(store.path), tokenizer=str(other)), seed=0)


def test_seq_len_longer_than_the_store_is_refused(tmp_path, corpus):
    store = open_store(data_cfg(tmp_path), seed=0)
    n = store.split("validation").n_tokens
    with pytest.raises(ValueError, match=f"data.seq_len={n} needs at least {n + 1} tokens"):
        TokenLoader(store.split("validation"), seq_len=n, seed=0)


def test_interrupted_prepare_leaves_nothing_that_looks_valid(tmp_path, corpus, monkeypatch):
    def crash(self):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C while shards were written

    monkeypatch.setattr(SplitWriter, "close", crash)
    cfg = data_cfg(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        open_store(cfg, seed=0)
    assert list(Path(cfg.cache_dir).iterdir()) == []
    monkeypatch.undo()
    assert TokenStore(open_store(cfg, seed=0).path).split("train").n_tokens > 0  # the retry succeeds


def test_corrupt_store_is_named(tmp_path, corpus):
    store = open_store(data_cfg(tmp_path), seed=0)
    shard = store.path / store.meta["splits"]["train"]["shards"][0]
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(ValueError, match=f"Data store {store.path} is corrupt: split 'train' holds"):
        TokenStore(store.path)


# --- Loader ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_feistel_is_a_permutation(n):
    out = FeistelPermutation(n, key=12345)(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    if n >= 1000:
        assert not np.array_equal(out, np.arange(n))
        assert not np.array_equal(out, FeistelPermutation(n, key=54321)(np.arange(n)))


@pytest.fixture
def split(tmp_path):
    writer = SplitWriter(tmp_path, "train", shard_tokens=1000)
    tokens = np.arange(5000) % 777
    writer.write(tokens, np.array([5000]))
    return SplitStream(tmp_path, "train", writer.close())


def test_an_epoch_visits_every_window_once(split):
    loader = TokenLoader(split, seq_len=16, seed=0)
    starts = loader.window_starts(np.arange(loader.n_windows))
    assert sorted(starts.tolist()) == list(range(0, loader.n_windows * 16, 16))
    next_epoch = loader.window_starts(np.arange(loader.n_windows, 2 * loader.n_windows))
    assert sorted(next_epoch.tolist()) == sorted(starts.tolist()) and not np.array_equal(next_epoch, starts)
    batch = loader.next_batch(4).numpy()
    for row, start in zip(batch, starts[:4]):
        np.testing.assert_array_equal(row, (np.arange(start, start + 17)) % 777)


@pytest.mark.parametrize("make", ["store", "synthetic"])
@pytest.mark.parametrize("world", [2, 4])
def test_rank_shards_are_disjoint_and_complete(split, make, world):
    def loader(rank, size):
        if make == "store":
            return TokenLoader(split, seq_len=16, seed=5, rank=rank, world_size=size)
        return SyntheticLoader(64, 4, seq_len=16, seed=5, rank=rank, world_size=size)

    single = loader(0, 1)
    ranks = [loader(r, world) for r in range(world)]
    for global_batch in (8, 16, 8, 24):  # batch size changes between steps, too
        whole = single.next_batch(global_batch)
        parts = [r.next_batch(global_batch) for r in ranks]
        assert all(len(p) == global_batch // world for p in parts)
        assert np.array_equal(np.concatenate(parts), whole.numpy())


def test_uneven_global_batch_is_refused(split):
    with pytest.raises(ValueError, match="global batch of 6 sequences does not split evenly over 4"):
        TokenLoader(split, 16, 0, rank=0, world_size=4).next_batch(6)


def test_changing_batch_size_keeps_the_order(split):
    a, b = TokenLoader(split, 128, seed=1), TokenLoader(split, 128, seed=1)
    ramped = np.concatenate([a.next_batch(n) for n in (4, 8, 12, 40)])
    steady = np.concatenate([b.next_batch(16) for _ in range(4)])
    assert a.n_windows < 64 and np.array_equal(ramped, steady)  # across an epoch boundary too


def test_mid_epoch_resume_equals_an_uninterrupted_run(split):
    straight = TokenLoader(split, 64, seed=2)
    expected = [straight.next_batch(8) for _ in range(30)]
    assert straight.epoch >= 2  # the run crosses epoch boundaries
    first = TokenLoader(split, 64, seed=2)
    resumed_from = [first.next_batch(8) for _ in range(13)]
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    second = TokenLoader(split, 64, seed=2)
    second.load_state_dict(state)
    got = resumed_from + [second.next_batch(8) for _ in range(17)]
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    with pytest.raises(ValueError, match="saved with seq_len=64, but this run has seq_len=32"):
        TokenLoader(split, 32, seed=2).load_state_dict(state)


def test_prepare_command_prints_the_store(tmp_path, corpus):
    result = subprocess.run([sys.executable, "-m", "dsv3.train.prepare", f"data.source={corpus}",
                             f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=300", "data.num_proc=2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    assert Path(lines["store"]).parent == tmp_path / "cache" and lines["vocab_size"] == "300"
    assert "tokens" in lines["train"] and "documents" in lines["validation"]
    bad = subprocess.run([sys.executable, "-m", "dsv3.train.prepare", f"data.source={tmp_path / 'missing'}"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no such file or folder" in bad.stderr


def test_prepare_command_names_a_bad_line_and_writes_nothing(tmp_path):
    file = tmp_path / "rows.jsonl"
    file.write_text('{"text": "a"}\n{"text": "b", oops}\n')
    result = subprocess.run([sys.executable, "-m", "dsv3.train.prepare", f"data.source={file}",
                             f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=300"],
                            capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert errors == [f"error: data.source={file}: {file} line 2 is not valid JSON: "
                      "Expecting property name enclosed in double quotes."]
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []
