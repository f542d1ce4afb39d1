"""``fusionzoo push RUN_OR_FOLDER REPO_ID``: upload a trained model and its model card to the Hugging Face Hub."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from ..hub_push import CARD_NAME, check_repo_id, push_to_hub, write_hub_folder
from . import UsageError

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    """Push (or with ``--out``, only write) the folder and print where it went."""
    try:
        check_repo_id(args.repo_id)
        if args.out is not None:
            out = write_hub_folder(args.source, args.out, repo_id=args.repo_id)
            files = sorted(p.relative_to(out).as_posix() for p in Path(out).rglob("*") if p.is_file())
            print(f"wrote {out}: {', '.join(files)} (nothing uploaded; read {Path(out) / CARD_NAME}, then push "
                  f"without --out)")
            return 0
        url = push_to_hub(args.source, args.repo_id, private=args.private, token=args.token,
                          commit_message=args.message, revision=args.revision)
    except (ValueError, FileNotFoundError, FileExistsError, json.JSONDecodeError) as e:
        raise UsageError(f"push: {e}") from None
    except OfflineModeIsEnabled as e:
        raise UsageError(f"push: the Hub cannot be reached in offline mode (unset HF_HUB_OFFLINE): {e}") from None
    except HfHubHTTPError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"push: the Hub refused the upload to {args.repo_id!r}: {first} (log in with `hf auth "
                         "login`, or pass --token / set HF_TOKEN with write access)") from None
    print(f"pushed {args.source} to https://huggingface.co/{args.repo_id}: {url}")
    print(f"load it with fusionzoo.from_pretrained({args.repo_id!r})")
    return 0
