"""What a capture agent's change journal is relative to (``lineage.json`` beside the journal).

The journal holds every acknowledged write the target has not acknowledged yet. That set is
the exact difference between the volume and a replica only while the replica is the one the
journal has been shipping to, and only if the journal has existed since then:

  journal_started  the journal was created by this agent; if it is missing later, it was lost
                   (a wiped disk) and nothing can be said about what it held
  synced           per volume: the replica generation a resync completed into (verified);
                   the journal's unreleased records are the difference to that replica
  promoted_from    per volume: the replica generation this site promoted; the journal started
                   at that promotion, so it holds every block written here since

Two sites exchange these at re-protection: the demoted old primary reports its unreleased
blocks relative to its ``synced`` generation; the new primary, whose journal started at the
promotion of that very generation, ships its own journal's blocks plus those, nothing else.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field

from drctl.files import atomic_write

log = logging.getLogger(__name__)

FILE = "lineage.json"


@dataclass
class Lineage:
    journal_started: bool = False
    synced: dict[str, str] = field(default_factory=dict)
    promoted_from: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: str) -> Lineage:
        path = os.path.join(directory, FILE)
        try:
            with open(path, encoding="utf-8") as fh:
                doc = json.load(fh)
            return cls(bool(doc["journal_started"]), {str(k): str(v) for k, v in
                                                      doc["synced"].items()},
                       {str(k): str(v) for k, v in doc["promoted_from"].items()})
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s is unreadable (%s): the change journal's lineage is unknown", path,
                        exc)
            return cls(journal_started=True)  # so a missing journal is seen as lost

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, FILE)
        atomic_write(path, json.dumps(asdict(self), sort_keys=True).encode())
