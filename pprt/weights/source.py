"""Where a model's files come from: a local directory, or a Hugging Face hub repository.

For a hub id, files are fetched one by one on demand with huggingface_hub,
which honours HF_HUB_CACHE, HF_HUB_OFFLINE, HF_ENDPOINT and HF_TOKEN. When a
repository cannot be resolved, the error says why, in one line:

- "the hub cannot be reached (<network error>; set HF_HUB_OFFLINE=1 to use
  the cache, or pass a directory)": no answer from the hub and no cached copy;
- "... is not in the local cache": HF_HUB_OFFLINE is set and the file was
  never downloaded;
- "no such repository or no access (HF_TOKEN ...)": the hub answered 401/404
  (it answers 401 for missing, private and gated repositories alike);
- "the repository has no <file>": the repository exists without that file.

huggingface_hub retries a failed metadata request for about 25-40 s when no
cached copy exists (five retries with exponential backoff). So the first
file of a source is preceded by one metadata request without retries
(`get_hf_file_metadata`, HF_HUB_ETAG_TIMEOUT seconds at most): when the hub
does not answer, the source answers from the cache from then on, at once.

Knows nothing about file formats: checkpoint.py reads what this finds.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import CheckpointError

log = logging.getLogger("pprt")

# Files a model may lack: an offline cache without them is not an error.
OPTIONAL_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                  "model.safetensors.index.json", "model.safetensors")


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


class ModelSource:
    """A model directory, or a hub repository fetched file by file on demand."""

    def __init__(self, model: str | os.PathLike, revision: str | None = None):
        self.name = str(model)
        self.revision = revision
        path = Path(model).expanduser()
        if path.is_dir():
            self.local: Path | None = path
        elif looks_like_hub_id(self.name):
            self.local = None
        else:
            raise CheckpointError(f"model {self.name!r}: no such directory, and not a hub id (org/name)")
        self._probed = False
        self._unreachable: str | None = None  # the network error, once the hub did not answer
        self._warned = False

    def get(self, filename: str) -> Path | None:
        """Local path of `filename`, fetching it from the hub if needed; None if the model has no such file.

        Raises CheckpointError (one line, see the module docstring) when a hub file cannot be had.
        """
        if self.local is not None:
            p = self.local / filename
            return p if p.is_file() else None
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HTTPError, LocalEntryNotFoundError

        offline = constants.is_offline_mode()
        if not offline and not self._probed and not self._probe(filename):
            return None  # the hub says the repository has no such file
        try:
            path = Path(hf_hub_download(self.name, filename, revision=self.revision,
                                        local_files_only=offline or self._unreachable is not None))
        except LocalEntryNotFoundError as e:  # (a subclass of EntryNotFoundError: first)
            if filename in OPTIONAL_FILES:
                return None  # an optional file absent from an offline cache
            if offline:
                raise CheckpointError(f"model {self.name!r}: {filename} is not in the local cache "
                                      f"({constants.HF_HUB_CACHE}; HF_HUB_OFFLINE is set)") from e
            raise self._unreachable_error(self._unreachable or _one_line(e.__cause__ or e)) from e
        except EntryNotFoundError:
            return None
        except (HTTPError, OSError, ValueError) as e:  # ValueError: a repo id the hub's rules refuse
            raise self._hub_error(e) from e
        if self._unreachable is not None and not self._warned:
            self._warned = True
            log.warning("model %r: the hub cannot be reached (%s): using the cached files", self.name,
                        self._unreachable)
        return path

    def require(self, filename: str) -> Path:
        p = self.get(filename)
        if p is None:
            where = f"{self.local}: no {filename}" if self.local is not None else \
                f"model {self.name!r}: the repository has no {filename}"
            raise CheckpointError(where)
        return p

    # ---- the hub -----------------------------------------------------------------------------
    def _probe(self, filename: str) -> bool:
        """One metadata request, no retries. False when the repository lacks `filename`;
        raises for a missing repository or no access; notes a hub that does not answer."""
        from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HTTPError

        self._probed = True
        url = hf_hub_url(self.name, filename, revision=self.revision)
        try:
            get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        except EntryNotFoundError:
            return False
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status is not None and (status in (408, 429) or status >= 500):  # the hub is there but failing
                self._unreachable = f"HTTP {status} from {constants.ENDPOINT}"
                return True
            raise self._hub_error(e) from e
        except (HTTPError, OSError) as e:  # no answer: DNS, refused, timeout, TLS
            self._unreachable = _one_line(e)
        return True

    def _unreachable_error(self, why: str) -> CheckpointError:
        return CheckpointError(f"model {self.name!r}: the hub cannot be reached ({why}; set HF_HUB_OFFLINE=1 "
                               "to use the cache, or pass a directory)")

    def _hub_error(self, e: Exception) -> CheckpointError:
        from huggingface_hub import get_token
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                            RevisionNotFoundError)

        status = getattr(getattr(e, "response", None), "status_code", None)
        token = "a token is set" if get_token() else "no token: set HF_TOKEN"
        if isinstance(e, GatedRepoError):
            why = f"the repository is gated: accept its terms on the hub, with a token that may read it ({token})"
        elif isinstance(e, RevisionNotFoundError):
            why = f"no revision {self.revision!r} in the repository"
        elif isinstance(e, RepositoryNotFoundError) or status in (401, 403):
            why = f"no such repository or no access (HTTP {status}; {token})"
        elif isinstance(e, HfHubHTTPError):
            why = f"the hub answered HTTP {status} ({_one_line(e)})"
        else:
            why = _one_line(e)
        return CheckpointError(f"model {self.name!r}: {why}")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]
