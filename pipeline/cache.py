"""What keys the caches under reference.cache_dir: a fingerprint of the inputs and settings that
change their contents. The data stage's folder and the reference scores beside it are reused
only while their fingerprint matches."""

import glob
import hashlib
import json
import os

CACHE_FORMAT = 4  # bump when the cached columns or their meaning change


def fingerprint(files: list[str], model_folders: list[str], settings: dict) -> str:
    """sha256 of the input files (path, size, mtime), the model folders' config, tokenizer and
    weight files, and the settings."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": CACHE_FORMAT, **settings}, sort_keys=True, default=str).encode())
    for file in files:
        stat = os.stat(file)
        digest.update(f"{os.path.abspath(file)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    for folder in model_folders:
        digest.update(folder.encode())
        for name in sorted(glob.glob(os.path.join(folder, "*.json")) + glob.glob(os.path.join(folder, "*.safetensors"))):
            stat = os.stat(name)
            digest.update(f"{os.path.basename(name)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]
