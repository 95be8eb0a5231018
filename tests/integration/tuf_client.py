"""A fleet device's view of adaptd's adapter repository, through python-tuf's reference client.

Usage: tuf_client.py ROOT_JSON BASE_URL WORK_DIR TARGET...
Trusts only ROOT_JSON, updates the metadata from BASE_URL/metadata/, and for each TARGET prints
one JSON line: {"target", "found", "custom", "sha256", "bytes"} (the file downloaded and
verified against the signed length and hashes).
"""

import hashlib
import json
import os
import sys

from tuf.ngclient import Updater


def main() -> None:
    root, base, work, *targets = sys.argv[1:]
    metadata_dir = os.path.join(work, "metadata")
    target_dir = os.path.join(work, "targets")
    os.makedirs(metadata_dir, exist_ok=True)
    os.makedirs(target_dir, exist_ok=True)
    with open(root, "rb") as f:
        trusted_root = f.read()
    updater = Updater(
        metadata_dir=metadata_dir,
        metadata_base_url=f"{base}/metadata/",
        target_dir=target_dir,
        target_base_url=f"{base}/targets/",
        bootstrap=trusted_root,
    )
    updater.refresh()
    for name in targets:
        info = updater.get_targetinfo(name)
        if info is None:
            print(json.dumps({"target": name, "found": False}))
            continue
        path = updater.download_target(info)
        with open(path, "rb") as f:
            data = f.read()
        print(json.dumps({"target": name, "found": True, "custom": info.custom, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}))


if __name__ == "__main__":
    main()
