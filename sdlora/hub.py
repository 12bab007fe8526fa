"""Files from the Hugging Face Hub, fetched by name before anything heavy loads: an unknown id, a missing file or no
network is one line naming the flag."""
from __future__ import annotations

import re

from .errors import UserError

# What a Hub model id looks like: "name" or "owner/name".
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hub_file(name: str, filename: str, flag: str, kind: str, revision: str | None = None,
             cache_dir: str | None = None, token: str | None = None, missing_ok: bool = False) -> str | None:
    """The local path of `filename` in the Hub repo `name` (downloaded or cached), or a one-line UserError saying
    why not (offline, no such repo or revision, not a `kind` repo); None for a file the repo lacks if `missing_ok`."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return hf_hub_download(name, filename, revision=revision, cache_dir=cache_dir, token=token)
    except LocalEntryNotFoundError:  # before EntryNotFoundError: it may be a subclass of it
        raise UserError(f"{flag} {name}: not a local folder and the Hub is unreachable (offline?); "
                        f"download it first or give a local path") from None
    except RepositoryNotFoundError:
        raise UserError(f"{flag} {name}: no such model on the Hub (or it is private: log in or pass --hub_token)") from None
    except RevisionNotFoundError:
        raise UserError(f"{flag} {name}: revision {revision!r} not found") from None
    except EntryNotFoundError:
        if missing_ok:
            return None
        raise UserError(f"{flag} {name}: not a {kind} repo (no {filename})") from None
    except Exception as e:  # network errors of every kind
        raise UserError(f"{flag} {name}: could not reach the Hub ({type(e).__name__}); give a local path") from None
