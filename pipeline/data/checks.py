"""The data stage as the driver runs it: cached by a fingerprint of the inputs and settings,
with the checks that decide whether the data can train and the label-balance advice."""

import json
import os
import shutil
from dataclasses import asdict

from pipeline.config import Config
from pipeline.data.formats import DataError
from pipeline.data.inputs import list_input_files
from pipeline.data.stage import DataSettings, process_feedback
from pipeline.cache import check_folder, fingerprint, private_folder, staging_name, sync_folder_of, sync_tree


def data_settings(config: Config, tokenizer_path: str) -> DataSettings:
    d, k = config.data, config.kto
    return DataSettings(tokenizer_path=tokenizer_path, max_length=k.max_length, max_prompt_length=k.max_prompt_length,
                        kl_block_size=d.kl_block_size, format=d.format, label_map=dict(d.label_map),
                        prompt_delimiter=d.prompt_delimiter, deduplicate=d.deduplicate, max_text_chars=d.max_text_chars,
                        trust_remote_code=config.model.trust_remote_code,
                        held_out_fraction=0.0 if config.eval.path else config.eval.split_fraction,
                        allow_control_tokens=d.allow_control_tokens)


def examine(config: Config, data_path: str, tokenizer_path: str) -> tuple[str, dict]:
    """The data stage for one path, cached: (its cache folder, its counts). The folder holds
    examples/ (kept, KL-paired rows), held_out/ (with eval.split_fraction), rejected/ (rows with
    reasons) and report.json; its tables are checked (pipeline/cache.py) before anything uses them."""
    settings = data_settings(config, tokenizer_path)
    files, _ = list_input_files(data_path)
    cache_root = private_folder(os.path.abspath(config.reference.cache_dir))
    folder = os.path.join(cache_root, fingerprint(files, [tokenizer_path], asdict(settings)))
    report_path = os.path.join(folder, "report.json")
    if not os.path.exists(report_path):
        _run_stage(data_path, settings, folder)
    for part, kind in (("examples", "examples"), ("held_out", "examples"), ("rejected", "rejected")):
        check_folder(os.path.join(folder, part), kind)
    with open(report_path) as f:
        report = json.load(f)
    return folder, {**report, "rejected_dir": os.path.join(folder, "rejected")}


def _run_stage(data_path: str, settings: DataSettings, folder: str) -> None:
    """The data stage into a private staging folder named by host and pid, synced to disk, then
    renamed: the cache entry is complete or absent, and a failed stage leaves no staging folder."""
    staging = staging_name(folder)
    try:
        private_folder(staging)  # (exists even when the data holds no rows: report.json goes here)
        report = process_feedback(data_path, settings, staging)
        with open(os.path.join(staging, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
        sync_tree(staging)
        os.rename(staging, folder)
    except OSError:
        if not os.path.exists(os.path.join(folder, "report.json")):
            raise
        # another run finished the same stage first: its folder stands, ours goes
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    sync_folder_of(folder)


def check_counts(config: Config, counts: dict, data_path: str) -> None:
    """Stop when the data cannot train: too many rejected rows, or too few kept to pair."""
    read, rejected = counts["read"], counts["rejected"]
    if read == 0:
        raise DataError(f"data path {data_path!r}: its files hold no rows")
    reasons = ", ".join(f"{reason}: {n}" for reason, n in counts["rejected_by_reason"].items())
    if rejected / read > config.data.max_rejected_fraction:
        raise DataError(
            f"data path {data_path!r}: {rejected} of {read} rows ({rejected / read:.1%}) were rejected ({reasons}), "
            f"above data.max_rejected_fraction = {config.data.max_rejected_fraction:g}. The rows and their reasons "
            f"are in {counts['rejected_dir']}; fix the data, or raise data.max_rejected_fraction"
            + (". Text that holds control tokens (<|im_start|>, </s>...) is usually a prompt templated by hand: "
               "give the conversation as lists of messages, or set data.allow_control_tokens: true"
               if "control_token_in_text" in counts["rejected_by_reason"] else ""))
    if counts["kept"] < 2:
        raise DataError(f"data path {data_path!r}: {counts['kept']} usable row(s) ({reasons or 'none rejected'}); "
                        "KL pairing needs at least 2")
    if config.kto.loss_type == "kto_pairwise":
        _check_pairs(counts, data_path)
        if "held_out_counts" in counts:
            _check_pairs(counts["held_out_counts"], f"{data_path} (its held-out share)")
    if "held_out_counts" in counts and counts["held_out"] < 2:
        raise DataError(f"data path {data_path!r}: eval.split_fraction = {config.eval.split_fraction:g} held out "
                        f"{counts['held_out']} of {counts['read'] - counts['rejected']} usable rows (whole prompts "
                        "go to one side); the eval set needs at least 2 to pair: raise eval.split_fraction, or "
                        "give eval.path")


def _check_pairs(counts: dict, data_path: str) -> None:
    """kto_pairwise trains on whole preference pairs only: a row without its other half has no pair
    utility to join."""
    if counts["unpaired_rows"]:
        raise DataError(
            f"data path {data_path!r}: kto.loss_type kto_pairwise needs every row in a (chosen, rejected) pair, "
            f"but {counts['unpaired_rows']} of {counts['kept']} kept rows have no other half (rows of an unpaired "
            "format, or pairs whose other answer was quarantined: see the rejected rows). Use paired or "
            "implicit_paired data whose pairs pass validation, or kto.loss_type kto")


def pairing_advice(counts: dict, data_path: str) -> str | None:
    """A warning when more than 1% of kept rows got a KL completion to their own prompt (a block
    that one prompt fills entirely): z0 then measures matched pairs, not the mismatched ones KTO
    estimates KL(policy || reference) from."""
    same, kept = counts.get("kl_same_prompt_rows", 0), counts["kept"]
    if not kept or same <= 0.01 * kept:
        return None
    return (f"data path {data_path!r}: {same} of {kept} rows ({same / kept:.1%}) have a KL completion that answers "
            f"their own prompt: a block of data.kl_block_size = {counts['kl_block_size']} rows held one prompt only. "
            "Raise data.kl_block_size above the largest run of rows sharing a prompt, or interleave the prompts")


def weight_advice(desirable_weight, undesirable_weight: float, n_desirable: int, n_undesirable: int) -> dict:
    """KTO paper, Eq. 8: keep lambda_D n_D / (lambda_U n_U) in [1, 4/3]; `auto` sets it to 1."""
    if n_desirable == 0 or n_undesirable == 0:
        return {"ratio": None, "in_range": False, "auto_desirable_weight": None,
                "advice": f"{n_desirable} desirable and {n_undesirable} undesirable rows: one side of the KTO "
                          "loss is empty; KTO needs both kinds of feedback"}
    auto = undesirable_weight * n_undesirable / n_desirable
    weight = auto if desirable_weight == "auto" else desirable_weight
    ratio = weight * n_desirable / (undesirable_weight * n_undesirable)
    in_range = 1 - 1e-9 <= ratio <= 4 / 3 + 1e-9
    named = "auto = " if desirable_weight == "auto" else ""
    advice = (f"desirable_weight * n_D / (undesirable_weight * n_U) = {named}{weight:.4g} * {n_desirable} / "
              f"({undesirable_weight:.4g} * {n_undesirable}) = {ratio:.3f}, "
              + ("within [1, 4/3]" if in_range else f"outside [1, 4/3]; kto.desirable_weight: auto "
                                                    f"(= {auto:.4g} here) would bring it to 1"))
    return {"ratio": ratio, "in_range": in_range, "auto_desirable_weight": auto, "advice": advice}
