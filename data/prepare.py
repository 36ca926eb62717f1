"""Raw text -> tokens -> FIM -> packed token store (``python -m dsv3.train.prepare [overrides]`` runs it).

Reads the source named by ``data.source`` (text and JSON files directly, Parquet and hub datasets
through Hugging Face ``datasets``; a file that cannot be read fails naming it), splits documents into
train and validation by a hash of their name, trains (or loads) the tokenizer, tokenises in
``data.num_proc`` processes with FIM on training documents, and writes a store (see store.py)
under a temporary name that is renamed when complete. The store's folder name is a hash of every
setting that shapes its content, so a store is prepared once and found again by later runs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sysconfig
import time
import zlib
from pathlib import Path

import pyarrow.compute
import pyarrow.parquet

from .config import DataConfig
from .fim import encode_documents
from .store import FORMAT, SplitWriter, TokenStore
from .tokenizer import load_tokenizer, special_ids, tokenizer_sha256, train_bpe

log = logging.getLogger("dsv3.data")

TEXT_SUFFIXES = {".txt", ".py", ".md", ".rst", ".c", ".h", ".cpp", ".rs", ".go", ".js", ".ts", ".java"}
TABLE_SUFFIXES = {".jsonl", ".json", ".parquet"}
DOCUMENT_SUFFIXES = TEXT_SUFFIXES | TABLE_SUFFIXES
SHARD_TOKENS = 1 << 28  # 1 GiB of uint32 per shard
PROGRESS_BYTES = 4_000_000  # tokenisation logs its progress after about this much text


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_local(source: str) -> bool:
    """A path that exists, or one that reads like a path (a hub name reads like `org/name`)."""
    path = Path(source).expanduser()
    return path.exists() or source.startswith((".", "/", "~")) or path.suffix in DOCUMENT_SUFFIXES


def source_identity(cfg: DataConfig) -> tuple[str, str]:
    """(a short name for folder names, a string that changes whenever the source's content may)."""
    if cfg.source == "stdlib":
        return "stdlib", f"stdlib:{platform.python_version()}:{stdlib_root()}"
    if _is_local(cfg.source):
        path = Path(cfg.source).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"data.source={cfg.source}: no such file or folder.")
        try:
            stamp = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in _local_files(path)]
        except OSError as error:
            raise _cannot_read(cfg.source, error.filename or path, error) from None
        return path.name, f"local:{path}:{hashlib.sha256(repr(stamp).encode()).hexdigest()}"
    return cfg.source.replace("/", "_"), f"hub:{cfg.source}:{cfg.hf_subset}:{cfg.hf_split}"


def store_path(cfg: DataConfig, seed: int) -> Path:
    if cfg.store:
        return Path(cfg.store)
    name, identity = source_identity(cfg)
    tokenizer = (hashlib.sha256(Path(cfg.tokenizer).read_bytes()).hexdigest() if cfg.tokenizer
                 else f"bpe:{cfg.vocab_size}:{cfg.tokenizer_train_bytes}")
    if cfg.tokenizer and not Path(cfg.tokenizer).is_file():
        raise FileNotFoundError(f"data.tokenizer={cfg.tokenizer}: no such file.")
    key = json.dumps([FORMAT, identity, tokenizer, cfg.text_field, cfg.max_documents, cfg.validation_fraction,
                      cfg.fim_rate, cfg.fim_spm_rate, seed])
    return Path(cfg.cache_dir) / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    # A dangling link named like a document is listed too, so that it fails rather than shrinks the corpus.
    return sorted(p for p in path.rglob("*") if p.suffix in DOCUMENT_SUFFIXES
                  and (p.is_file() or (p.is_symlink() and not p.exists())))


def _cannot_read(source: str, file, error: OSError) -> ValueError:
    return ValueError(f"data.source={source}: cannot read {file}: {error.strerror or error}.")


def _read_bytes(file: Path, source: str) -> bytes:
    try:
        return file.read_bytes()
    except OSError as error:  # its own message lacks the setting, and for some errors the file too
        raise _cannot_read(source, file, error) from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _read_text_files(files: list[Path], root: Path, source: str, allow_binary: bool) -> tuple[list[dict], int]:
    """One document per file; undecodable bytes become U+FFFD and are counted. A file holding a NUL
    byte is binary (text never holds one) and refused unless `allow_binary`."""
    rows, replaced = [], 0
    for file in files:
        raw = _read_bytes(file, source)
        if not allow_binary and b"\0" in raw:
            raise ValueError(f"data.source={source}: {file} holds NUL bytes, so it is binary rather than text; "
                             "remove it, or set data.allow_binary=true to read it anyway.")
        text = raw.decode("utf-8", errors="replace")
        if "\ufffd" in text:
            replaced += len(raw) - len(raw.decode("utf-8", errors="ignore").encode("utf-8"))
        rows.append({"text": text, "key": str(file.relative_to(root) if file != root else file.name)})
    return rows, replaced


def _json_rows(file: Path, source: str):
    """(where, row) for each row of a JSON Lines file, or of a .json file that holds one array of rows;
    read here rather than by ``datasets`` so that an error can name the line."""
    raw = _read_bytes(file, source)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ValueError(f"data.source={source}: {file} line {line} is not UTF-8, which JSON must be.") from None
    array = file.suffix == ".json" and text.lstrip().startswith("[")
    for number, chunk in [(1, text)] if array else enumerate(text.split("\n"), 1):  # not splitlines: U+2028
        if not chunk.strip():
            continue
        try:
            value = json.loads(chunk)
        except json.JSONDecodeError as error:
            raise ValueError(f"data.source={source}: {file} line {number + error.lineno - 1} is not valid JSON: "
                             f"{error.msg}.") from None
        if array:
            yield from ((f"item {i}", row) for i, row in enumerate(value, 1))
        else:
            yield f"line {number}", value


def _json_texts(file: Path, cfg: DataConfig) -> list[str]:
    """The data.text_field string of every row of a JSON file."""
    texts = []
    for where, row in _json_rows(file, cfg.source):
        if not isinstance(row, dict):
            raise ValueError(f"data.source={cfg.source}: {file} {where} is not a JSON object.")
        if cfg.text_field not in row:
            raise ValueError(f"data.text_field={cfg.text_field!r} is not a field of {file} {where} "
                             f"(its fields: {', '.join(row) or 'none'}).")
        if not isinstance(row[cfg.text_field], str):
            raise ValueError(f"data.text_field={cfg.text_field!r} of {file} {where} is "
                             f"{json.dumps(row[cfg.text_field])[:40]}, not a string.")
        texts.append(row[cfg.text_field])
    return texts


def _read_parquet(files: list[Path], source: str):
    import datasets

    try:
        return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    except Exception as error:  # datasets wraps pyarrow's error, which does not name the file: find it
        for file in files:
            try:
                pyarrow.parquet.read_table(pyarrow.BufferReader(_read_bytes(file, source)))
            except (OSError, pyarrow.ArrowException) as bad:
                raise ValueError(f"data.source={source}: {file} is not a readable Parquet file: "
                                 f"{_first_line(bad)}") from None
        raise ValueError(f"data.source={source}: its Parquet files cannot be read together: "
                         f"{_first_line(error.__cause__ or error)}") from None


def read_source(cfg: DataConfig):
    """The documents as a datasets.Dataset with columns text and key, and the count of replaced bytes."""
    import datasets

    replaced = 0
    if cfg.source == "stdlib":
        root = stdlib_root()
        files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
        # Source code by construction: a test-data file with a NUL byte must not break the default corpus.
        rows, replaced = _read_text_files(files, root, cfg.source, allow_binary=True)
        dataset = datasets.Dataset.from_list(rows)
    elif _is_local(cfg.source):
        path = Path(cfg.source).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"data.source={cfg.source}: no such file or folder.")
        files = _local_files(path)
        root = path if path.is_dir() else path.parent
        text_files = [f for f in files if f.suffix in TEXT_SUFFIXES]
        json_files = [f for f in files if f.suffix in (".jsonl", ".json")]
        parquet_files = [f for f in files if f.suffix == ".parquet"]
        parts = []
        if text_files:
            rows, replaced = _read_text_files(text_files, root, cfg.source, cfg.allow_binary)
            parts.append(datasets.Dataset.from_list(rows))
        if json_files:
            texts = [text for file in json_files for text in _json_texts(file, cfg)]
            parts.append(datasets.Dataset.from_dict(  # rows are named by their text, as in _text_table
                {"text": texts, "key": texts},
                features=datasets.Features({"text": datasets.Value("string"), "key": datasets.Value("string")})))
        if parquet_files:
            parts.append(_text_table(_read_parquet(parquet_files, cfg.source), cfg, cfg.source))
        if not parts:
            raise ValueError(f"data.source={cfg.source} holds no readable files "
                             f"({', '.join(sorted(DOCUMENT_SUFFIXES))}).")
        dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    else:
        try:
            hub = datasets.load_dataset(cfg.source, cfg.hf_subset or None, split=cfg.hf_split)
        except Exception as error:  # datasets raises many types; the first line says what failed
            raise ValueError(f"data.source={cfg.source} is neither a local path nor a Hugging Face dataset "
                             f"that is cached or reachable: {_first_line(error)}") from None
        dataset = _text_table(hub, cfg, cfg.source)
    if cfg.max_documents:
        dataset = dataset.select(range(min(cfg.max_documents, len(dataset))))
    dataset = dataset.filter(lambda texts: [bool(t) for t in texts], input_columns="text", batched=True)
    if len(dataset) == 0:
        raise ValueError(f"data.source={cfg.source} holds no non-empty documents.")
    return dataset, replaced


def _text_table(table, cfg: DataConfig, name: str):
    if cfg.text_field not in table.column_names:
        raise ValueError(f"data.text_field={cfg.text_field!r} is not a column of {name} "
                         f"(its columns: {', '.join(table.column_names)}).")
    kind = table.data.schema.field(cfg.text_field).type
    if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
        raise ValueError(f"data.text_field={cfg.text_field!r} of {name} holds {kind} values, not strings.")
    texts = table.select_columns([cfg.text_field])
    if cfg.text_field != "text":  # rename_column refuses a name already taken, even by the column itself
        texts = texts.rename_column(cfg.text_field, "text")
    return texts.map(lambda batch: {"key": batch["text"]}, batched=True)  # rows are named by their text


def _tokenize(batch, indices, tokenizer_json, seed, fim_rate, spm_rate, validation_fraction, offset):
    """datasets.map worker: split flag, token ids with FIM, and byte counts for a batch of documents
    (indices count from the part's first document, `offset` in the whole dataset)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    special = special_ids(tokenizer, "of the store")
    indices = [offset + i for i in indices]
    validation = [zlib.crc32(key.encode()) / 2**32 < validation_fraction for key in batch["key"]]
    ids, fim = [None] * len(indices), [False] * len(indices)
    for is_validation in (False, True):
        rows = [i for i, v in enumerate(validation) if v == is_validation]
        if rows:  # FIM applies to training documents only; validation stays plain text
            docs, flags = encode_documents([batch["text"][i] for i in rows], [indices[i] for i in rows], tokenizer,
                                           special, seed, 0.0 if is_validation else fim_rate, spm_rate)
            for i, doc, flag in zip(rows, docs, flags):
                ids[i], fim[i] = doc, flag
    return {"ids": ids, "validation": validation, "fim": fim,
            "bytes": [len(t.encode("utf-8")) for t in batch["text"]]}


def prepare(cfg: DataConfig, seed: int, path: Path) -> TokenStore:
    """Writes the store for `cfg` at `path`, complete or not at all."""
    if cfg.fim_rate > 0 and cfg.tokenizer:
        ids = special_ids(load_tokenizer(cfg.tokenizer), cfg.tokenizer)
        if not ids.has_fim:
            raise ValueError(f"data.fim_rate={cfg.fim_rate} needs FIM sentinels, which data.tokenizer="
                             f"{cfg.tokenizer} lacks; set data.fim_rate=0 or use a tokenizer that has them.")
    dataset, replaced = read_source(cfg)
    if replaced:
        log.warning("data.source=%s: %d undecodable bytes were replaced by U+FFFD (counted in meta.json)",
                    cfg.source, replaced)
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    else:
        log.info("training a byte-level BPE of %d tokens on %s", cfg.vocab_size, cfg.source)
        tokenizer = train_bpe(_training_texts(dataset, cfg), cfg.vocab_size)
    special = special_ids(tokenizer, cfg.tokenizer or "trained here")

    tokenized = _tokenize_in_parts(dataset, tokenizer, cfg, seed)

    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{path.name}.tmp-*"):  # left by an interrupted prepare
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        splits = {}
        for name, is_validation in (("train", False), ("validation", True)):
            part = tokenized.filter(lambda flags: [f == is_validation for f in flags],
                                    input_columns="validation", batched=True)
            writer = SplitWriter(tmp, name, SHARD_TOKENS)
            for batch in part.with_format("arrow").iter(batch_size=4096):
                ids = batch["ids"].combine_chunks() if hasattr(batch["ids"], "combine_chunks") else batch["ids"]
                writer.write(ids.flatten().to_numpy(), pyarrow.compute.list_value_length(ids).to_numpy())
            splits[name] = {**writer.close(), "bytes": int(sum(part["bytes"])),
                            "fim_documents": int(sum(part["fim"]))}
        if splits["train"]["tokens"] == 0:
            raise ValueError(f"data.source={cfg.source}: every document hashed into validation; "
                             f"lower data.validation_fraction={cfg.validation_fraction}.")
        tokenizer.save(str(tmp / "tokenizer.json"))
        meta = {"format": FORMAT, "source": cfg.source, "tokenizer": cfg.tokenizer or "trained byte-level BPE",
                "tokenizer_sha256": tokenizer_sha256(tokenizer), "vocab_size": tokenizer.get_vocab_size(),
                "special_ids": vars(special), "fim_rate": cfg.fim_rate, "fim_spm_rate": cfg.fim_spm_rate,
                "seed": seed, "validation_fraction": cfg.validation_fraction, "replaced_bytes": replaced,
                "splits": splits}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: its presence marks a whole store
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenStore(path)


def _tokenize_in_parts(dataset, tokenizer, cfg: DataConfig, seed: int):
    """The tokenised dataset, mapped in data.num_proc processes a part of about PROGRESS_BYTES of
    text at a time, with a log line after each part (they replace datasets' progress bar)."""
    import datasets

    sizes = [n for batch in dataset.with_format("arrow").iter(batch_size=4096)
             for n in pyarrow.compute.binary_length(batch["text"]).to_pylist()]
    total = sum(sizes)
    log.info("tokenizing %d documents (%.1f MB), data.num_proc=%d", len(sizes), total / 1e6, cfg.num_proc)
    features = datasets.Features({"ids": datasets.Sequence(datasets.Value("uint32")),
                                  "validation": datasets.Value("bool"), "fim": datasets.Value("bool"),
                                  "bytes": datasets.Value("int64")})
    kwargs = {"tokenizer_json": tokenizer.to_str(), "seed": seed, "fim_rate": cfg.fim_rate,
              "spm_rate": cfg.fim_spm_rate, "validation_fraction": cfg.validation_fraction}
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    parts, start, done, began = [], 0, 0, time.monotonic()
    try:
        while start < len(sizes):
            end, part_bytes = start, 0
            while end < len(sizes) and (end == start or part_bytes + sizes[end] <= PROGRESS_BYTES):
                part_bytes += sizes[end]
                end += 1
            part = dataset.select(range(start, end))
            parts.append(part.map(_tokenize, batched=True, batch_size=64, with_indices=True,
                                  num_proc=min(cfg.num_proc, end - start), remove_columns=part.column_names,
                                  features=features, fn_kwargs={**kwargs, "offset": start}))
            done, start = done + part_bytes, end
            log.info("tokenized %.1f of %.1f MB (%d%%) in %.1f s", done / 1e6, total / 1e6,
                     100 * done // max(total, 1), time.monotonic() - began)
    finally:
        if bars:
            datasets.enable_progress_bars()
    return datasets.concatenate_datasets(parts)


def _training_texts(dataset, cfg: DataConfig):
    """Training-split texts for the BPE, up to tokenizer_train_bytes."""
    budget = cfg.tokenizer_train_bytes
    for row in dataset:
        if zlib.crc32(row["key"].encode()) / 2**32 < cfg.validation_fraction:
            continue
        yield row["text"]
        budget -= len(row["text"])
        if budget <= 0:
            return


def open_store(cfg: DataConfig, seed: int) -> TokenStore:
    """The store for `cfg`: found in the cache, or prepared now. An explicit data.store must exist
    and, when data.tokenizer is set too, must have been made with that tokenizer."""
    path = store_path(cfg, seed)
    if cfg.store:
        if not path.exists():
            raise FileNotFoundError(f"data.store={cfg.store}: no such store.")
        store = TokenStore(path)
        if cfg.tokenizer:
            expected = tokenizer_sha256(load_tokenizer(cfg.tokenizer))
            if store.tokenizer_sha256 != expected:
                raise ValueError(f"data.store={cfg.store} was made with a different tokenizer than "
                                 f"data.tokenizer={cfg.tokenizer} (sha256 {store.tokenizer_sha256[:12]} "
                                 f"vs {expected[:12]}); prepare the store again with this tokenizer.")
        return store
    if (path / "meta.json").is_file():
        return TokenStore(path)
    log.info("preparing %s into %s (once; later runs reuse it)", cfg.source, path)
    return prepare(cfg, seed, path)
