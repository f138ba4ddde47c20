"""Reading an offline W&B run back from disk, for tests: its ``.wandb`` file is W&B's own record log."""

from __future__ import annotations

import json
import time
from pathlib import Path


def read_finished_wandb_run(path: Path, timeout: float = 60.0) -> tuple[list[dict], dict, dict, dict]:
    """``read_wandb_run`` once the file holds the run's exit record. W&B's service process writes the file and may
    still be flushing it when ``train()`` returns (CI once read a half-written last record)."""
    deadline = time.monotonic() + timeout
    while True:
        *contents, exited = read_wandb_run(path)
        if exited:
            return tuple(contents)
        assert time.monotonic() < deadline, f"{path} holds no exit record {timeout:.0f} s after the run ended"
        time.sleep(0.25)


def read_wandb_run(path: Path) -> tuple[list[dict], dict, dict, dict, bool]:
    """History rows, config, summary, run info, and whether the exit record is there yet, from an offline run's
    .wandb file (W&B's own record log)."""
    from wandb.proto import wandb_internal_pb2

    rows, config, summary, run_info, exited = [], {}, {}, {}, False
    for data in leveldb_log_records(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        exited = exited or kind == "exit"
        if kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
        elif kind in ("config", "run"):
            # The config reaches the file either inside the run record (when it is known at init) or as a later
            # config record; which one depends on W&B's flush timing, so both are read.
            for item in (record.config if kind == "config" else record.run.config).update:
                value = json.loads(item.value_json)
                config[item.key] = value.get("value", value) if isinstance(value, dict) else value
            if kind == "run":
                run_info = {"group": record.run.run_group, "name": record.run.display_name}
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return rows, config, summary, run_info, exited


def leveldb_log_records(raw: bytes):
    """Payloads of a .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB-log blocks of 32 KiB
    holding records (crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4). wandb >= 0.2x dropped its
    Python reader (wandb.sdk.internal.datastore), so the format is read here."""
    assert raw[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(raw):
        left_in_block = block - pos % block
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        length = int.from_bytes(raw[pos + 4 : pos + 6], "little")
        kind = raw[pos + 6]
        payload = raw[pos + 7 : pos + 7 + length]
        if len(payload) < length:  # the writer is still writing this record
            return
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            yield pending
            pending = b""
