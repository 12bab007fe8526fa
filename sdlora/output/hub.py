"""Share a finished run on the Hugging Face Hub: weights, model card and sample images only."""
from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import HfApi

from ..errors import UserError
from ..lora.formats import WEIGHTS_NAME
from .weights import kohya_name

log = logging.getLogger(__name__)

NEVER = ["checkpoint-*", "checkpoint-*/**", "logs/**", "validation/**", ".*", "**/.*", "*.tmp"]


def resolve_token(flag_token: str | None) -> str | None:
    """--hub_token, else huggingface_hub's own lookup ($HF_TOKEN, then a saved `hf auth login`)."""
    from huggingface_hub import get_token

    return flag_token or get_token() or None


def upload_patterns(output_dir: Path) -> list[str]:
    """Both LoRA files, the card, and the latest samples it shows (per-epoch samples stay local)."""
    return [WEIGHTS_NAME, kohya_name(output_dir), "README.md", "samples/latest_*.png"]


def push(output_dir: Path, repo_id: str, token: str | None, api: HfApi | None = None) -> str:
    """Create (or reuse) the model repo and upload what a user of the LoRA needs. Returns the repo URL.

    Runs after the local output is complete, so a failure here loses nothing: it is one line that
    says so and how to upload later."""
    api = api or HfApi()
    try:
        url = api.create_repo(repo_id=repo_id, token=token, exist_ok=True, repo_type="model")
        repo = getattr(url, "repo_id", None) or repo_id
        api.upload_folder(repo_id=repo, folder_path=str(output_dir), token=token, repo_type="model",
                          allow_patterns=upload_patterns(output_dir), ignore_patterns=NEVER, commit_message="Upload LoRA trained with sdlora")
    except Exception as e:  # network, auth, quota, a name taken: the reason in one line, never the token
        reason = redact((str(e).splitlines() or [""])[0][:200], token)
        raise UserError(f"--push_to_hub: uploading to {repo_id} failed ({type(e).__name__}: {reason}); the local "
                        f"output in {output_dir} is complete — upload it later with "
                        f"`hf upload {repo_id} {output_dir} --include {' '.join(repr(u) for u in upload_patterns(output_dir))}`") from None
    log.info("pushed %s to https://huggingface.co/%s", output_dir, repo)  # never the token
    return str(url)


def redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text
