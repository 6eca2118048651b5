"""A replay run as its own process, so that a test can kill it with SIGKILL: the engine
(`Replayer`) with its checkpoint kept in a file, as the operator keeps it in the DLQReplay's
status. Not a test module (no `test_` prefix).

    python replay_process.py TOPOLOGY_FILE REPLAY_ID CHECKPOINT_FILE RATE

Resumes from the file when it holds a checkpoint, else snapshots the DLQ first (and writes
that before sending anything, as the operator does). Exits 0 once the replay succeeded."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from kafka_retry.dlq import KafkaAccess
from kafka_retry.dlq_replay import Checkpoint, Outcome, Replayer
from kafka_retry.model import DLQReplayStatus, Topology


def _save(path: Path, cp: Checkpoint) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cp.to_status()))
    os.replace(tmp, path)  # a kill never leaves half a checkpoint


def main(topology_file: str, replay_id: str, checkpoint_file: str, rate: str) -> int:
    topology = Topology.from_json(Path(topology_file).read_text())
    replayer = Replayer(
        topology, KafkaAccess(topology.bootstrap_servers), replay_id=replay_id, rate=int(rate),
        checkpoint_interval=0.2,
    )  # fmt: skip
    path = Path(checkpoint_file)
    saved = path.exists() and Checkpoint.from_status(
        DLQReplayStatus.model_validate_json(path.read_text())
    )
    if not saved:
        saved = replayer.snapshot()
        _save(path, saved)
    result = replayer.run(saved, on_checkpoint=lambda cp: _save(path, cp))
    return 0 if result.outcome is Outcome.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
