#!/usr/bin/env python3
"""Re-expresses derivations that Nix 2.8 printed (`nix show-derivation`, in a fixture's
`derivations.*.show_derivation`) in the JSON shape of each later Nix, following Nix's own
schemas and writers (see README.md). Run from this directory:

    python3 convert.py ../../../../shared/fixtures/nix-oracle/*.json fods.json
"""
import base64
import copy
import json
import os
import sys

STORE = "/nix/store/"


def base(p):
    assert p.startswith(STORE), p
    return p[len(STORE):]


def method_algo(hash_algo):
    """`r:sha256` -> ("nar", "sha256"); `sha256` -> ("flat", "sha256"); `text:sha256`."""
    for prefix, method in (("r:", "nar"), ("text:", "text")):
        if hash_algo.startswith(prefix):
            return method, hash_algo[len(prefix):]
    return "flat", hash_algo


def nix_2_18(name, d):
    """2.15 added `name`; 2.18 made each input drv `{outputs, dynamicOutputs}`."""
    d = copy.deepcopy(d)
    d["name"] = name
    d["inputDrvs"] = {k: {"dynamicOutputs": {}, "outputs": v} for k, v in d["inputDrvs"].items()}
    return d


def nix_2_23(name, d):
    """2.23 split `hashAlgo` into `method` and `hashAlgo`."""
    d = nix_2_18(name, d)
    for o in d["outputs"].values():
        if "hashAlgo" in o:
            o["method"], o["hashAlgo"] = method_algo(o["hashAlgo"])
    return d


def v3(name, d):
    """2.32: `version: 3`, base names, no `path` on fixed outputs, `structuredAttrs`."""
    d = nix_2_23(name, d)
    d["version"] = 3
    d["inputSrcs"] = [base(p) for p in d["inputSrcs"]]
    d["inputDrvs"] = {base(k): v for k, v in d["inputDrvs"].items()}
    for o in d["outputs"].values():
        if "path" in o:
            if "hash" in o:
                del o["path"]
            else:
                o["path"] = base(o["path"])
    if "__json" in d["env"]:
        d["structuredAttrs"] = json.loads(d["env"].pop("__json"))
    return d


def v4(name, d):
    """2.33: `version: 4`, `inputs: {srcs, drvs}`, fixed outputs as `{method, hash: SRI}`."""
    d = v3(name, d)
    d["version"] = 4
    d["inputs"] = {"srcs": d.pop("inputSrcs"), "drvs": d.pop("inputDrvs")}
    for o in d["outputs"].values():
        if "hash" in o:
            sri = o.pop("hashAlgo") + "-" + base64.b64encode(bytes.fromhex(o["hash"])).decode()
            o["hash"] = sri
    return d


def drv_name(path):
    return base(path).split("-", 1)[1][: -len(".drv")]


def main():
    for fixture in sys.argv[1:]:
        graph = os.path.basename(fixture)[: -len(".json")]
        shows = {p: d["show_derivation"] for p, d in json.load(open(fixture))["derivations"].items()}
        docs = {
            "nix-2.8": shows,
            "nix-2.18": {p: nix_2_18(drv_name(p), d) for p, d in shows.items()},
            "nix-2.23": {p: nix_2_23(drv_name(p), d) for p, d in shows.items()},
            "nix-2.32": {base(p): v3(drv_name(p), d) for p, d in shows.items()},
        }
        docs["nix-2.33"] = {
            "derivations": {base(p): v4(drv_name(p), d) for p, d in shows.items()},
            "version": 4,
        }
        for fmt, doc in docs.items():
            with open(f"{graph}.{fmt}.json", "w") as f:
                json.dump(doc, f, indent=2, sort_keys=True)
                f.write("\n")


if __name__ == "__main__":
    main()
