"""Both scripts accept diffusers' flags with the same names, so existing tutorials run unchanged."""
import pytest

from sdlora.recipes import dreambooth as db
from sdlora.recipes import text_to_image as t2i

DIFFUSERS_T2I = """pretrained_model_name_or_path revision variant dataset_name dataset_config_name train_data_dir
image_column caption_column max_train_samples cache_dir output_dir seed resolution center_crop random_flip
train_batch_size num_train_epochs max_train_steps gradient_accumulation_steps gradient_checkpointing learning_rate
scale_lr lr_scheduler lr_warmup_steps snr_gamma use_8bit_adam allow_tf32 dataloader_num_workers adam_beta1 adam_beta2
adam_weight_decay adam_epsilon max_grad_norm push_to_hub hub_token hub_model_id logging_dir mixed_precision report_to
local_rank checkpointing_steps checkpoints_total_limit resume_from_checkpoint enable_xformers_memory_efficient_attention
noise_offset rank prediction_type validation_prompt num_validation_images validation_epochs
train_text_encoder lora_alpha target_modules save_precision""".split()

DIFFUSERS_DREAMBOOTH = """instance_data_dir instance_prompt class_data_dir class_prompt with_prior_preservation
prior_loss_weight num_class_images sample_batch_size prior_generation_precision train_text_encoder
pre_compute_text_embeddings tokenizer_max_length text_encoder_use_attention_mask validation_images lora_dropout
lr_num_cycles lr_power repeats text_encoder_lr snr_gamma noise_offset pretrained_model_name_or_path output_dir
resolution train_batch_size learning_rate lr_scheduler mixed_precision checkpointing_steps resume_from_checkpoint
validation_prompt push_to_hub enable_xformers_memory_efficient_attention use_8bit_adam rank""".split()


def _dests(parse_args, argv):
    return set(vars(parse_args(argv)))


@pytest.mark.parametrize("parse_args,argv,flags", [
    (t2i.parse_args, ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"], DIFFUSERS_T2I),
    (db.parse_args, ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p"],
     DIFFUSERS_DREAMBOOTH),
])
def test_reference_flags_exist(parse_args, argv, flags):
    missing = set(flags) - _dests(parse_args, argv)
    assert not missing, missing


def test_defaults_match_the_reference_where_users_rely_on_them():
    a = t2i.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"])
    assert (a.learning_rate, a.rank, a.lora_alpha, a.lr_scheduler, a.save_precision) == (1e-4, 4, None, "constant", "fp32")
    b = db.parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p"])
    assert (b.prior_loss_weight, b.num_class_images, b.output_dir) == (1.0, 100, "lora-dreambooth-model")


T2I_NEEDS = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"]
DB_NEEDS = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p"]


def _usage_error(capsys, parse, argv) -> str:
    """argparse's exit: status 2 and exactly one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as e:
        parse(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def test_typo_flag_is_one_line_naming_the_flag_meant(capsys):
    """Not 67 lines of usage: the unknown flag, and the one it is closest to."""
    assert _usage_error(capsys, t2i.parse_args, T2I_NEEDS + ["--learning_rat", "1e-3"]) == \
        "error: unrecognized argument --learning_rat; did you mean --learning_rate? (--help lists all flags)"
    assert _usage_error(capsys, db.parse_args, DB_NEEDS + ["--with_prior_preservaton"]) == \
        "error: unrecognized argument --with_prior_preservaton; did you mean --with_prior_preservation? " \
        "(--help lists all flags)"
    # other usage errors are one line too
    assert "--rank: invalid int value: 'four'" in _usage_error(capsys, t2i.parse_args, T2I_NEEDS + ["--rank", "four"])
    assert "exactly one of --dataset_name, --train_data_dir or --dataset_config" in _usage_error(capsys, t2i.parse_args, T2I_NEEDS[:2])


@pytest.mark.parametrize("parse,argv", [(t2i.parse_args, T2I_NEEDS), (db.parse_args, DB_NEEDS)])
def test_abbreviated_flags_are_refused(capsys, parse, argv):
    """argparse would take --learning_rat for --learning_rate; then a flag added later could change what an old
    command means. Only whole flag names are accepted, each named with the flag it abbreviates."""
    assert _usage_error(capsys, parse, argv + ["--max_train_step", "5", "--learning_rat=1e-3"]) == \
        "error: unrecognized arguments --max_train_step (did you mean --max_train_steps?), --learning_rat=1e-3 " \
        "(did you mean --learning_rate?) (--help lists all flags)"


def test_sdlora_cli_refuses_abbreviations_in_one_line(capsys):
    """`sdlora` and its subcommands: a subcommand's unknown flag is matched against that subcommand's flags;
    `sdlora train` hands its flags to the recipe's own parser."""
    from sdlora.cli import main

    assert _usage_error(capsys, main, ["inspect", "x.safetensors", "--jso"]) == \
        "error: unrecognized argument --jso; did you mean --json? (--help lists all flags)"
    assert _usage_error(capsys, main, ["train", "text-to-image", *T2I_NEEDS, "--learning_rat", "1"]).startswith(
        "error: unrecognized argument --learning_rat; did you mean --learning_rate?")
    assert "invalid choice: 'inspekt'" in _usage_error(capsys, main, ["inspekt", "x.safetensors"])


@pytest.mark.parametrize("recipe", [t2i, db])
def test_every_flag_has_help(recipe):
    """Each flag says what it does in --help (a setting's help is declared beside its default)."""
    bare = [a.option_strings[0] for a in recipe.parser()._actions if a.option_strings and not (a.help or "").strip()]
    assert not bare, bare


def _defaults_of_settings(tree, settings: dict) -> list[tuple[str, bool]]:
    """(flag, same as the declared default) for each `add_argument("--x", default=...)` whose flag is a TrainConfig
    setting's (`settings`: flag -> declared default)."""
    import ast

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags = [a.value.lstrip("-") for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            dest = next((getattr(k.value, "value", None) for k in node.keywords if k.arg == "dest"),
                        flags[0] if flags else None)
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            if dest in settings and default is not None:
                same = isinstance(default, ast.Constant) and default.value == settings[dest]
                found.append((dest, same))
    return found


def test_no_flag_repeats_a_settings_default():
    """A TrainConfig setting's default is declared once, in the field; the recipes' flags are made from it
    (cli/flags.py), and no other command repeats it."""
    import ast
    from dataclasses import fields
    from pathlib import Path

    from sdlora.training.config import TrainConfig, flag_name

    root = Path(__file__).resolve().parents[1]
    settings = {flag_name(f): f.default for f in fields(TrainConfig) if flag_name(f)}
    training = [*root.joinpath("sdlora/recipes").glob("*.py"), *root.glob("train_*.py"),
                *(root / "sdlora/cli" / f for f in ("flags.py", "run.py", "train.py"))]
    repeated = {}
    for p in [*root.joinpath("sdlora").rglob("*.py"), *root.glob("train_*.py")]:
        found = _defaults_of_settings(ast.parse(p.read_text()), settings)
        if bad := [d for d, same in found if same or p in training]:
            repeated[str(p.relative_to(root))] = bad
    assert not repeated, repeated


@pytest.mark.parametrize("recipe", [t2i, db])
def test_recipe_defaults_change_a_setting(recipe):
    """A recipe's DEFAULTS name settings and differ from their declared defaults (never a second copy of one)."""
    from sdlora.training.config import default_of

    same = {k: v for k, v in recipe.DEFAULTS.items() if default_of(k) == v}
    assert not same, same
    parsed = recipe.parser().parse_args(T2I_NEEDS if recipe is t2i else DB_NEEDS)
    assert all(getattr(parsed, k) == v for k, v in recipe.DEFAULTS.items())


def test_settings_are_tagged_for_resume_card_and_header():
    """The settings a checkpoint, the model card and the file header record are listed from the declaration."""
    from sdlora.training.config import MUST_MATCH, OPTIONAL, fields_tagged

    resume = fields_tagged("resume")
    optimizer = {"optimizer", "optimizer_args", "unet_lr", "prodigy_beta3", "prodigy_decouple",
                 "prodigy_use_bias_correction", "prodigy_safeguard_warmup", "loraplus_lr_ratio",
                 "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"}
    noise = {"multires_noise_iterations", "multires_noise_discount", "ip_noise_gamma", "ip_noise_gamma_random_strength",
             "min_timestep", "max_timestep", "loss_type", "huber_schedule", "huber_c", "huber_scale",
             "debiased_estimation_loss", "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss"}
    outcome = {"use_ema", "ema_decay", "ema_warmup", "ema_power", "early_stopping_patience"}
    assert {k for k, v in resume.items() if v == OPTIONAL} == optimizer | noise | outcome | \
        {"pretrained_vae_model_name_or_path", "zero_terminal_snr", "adam_weight_decay_text_encoder", "quantize_base",
         "clip_skip",
         # SD3's flow settings (config/flow.py): recorded only when changed, so earlier checkpoints stay as they were
         "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "precondition_outputs", "max_sequence_length",
         "drop_t5", "lora_layers", "lora_blocks"}
    assert {"rank", "learning_rate", "resolution", "bucketing"} <= {k for k, v in resume.items() if v == MUST_MATCH}
    assert fields_tagged("header")["rank"] == "ss_network_dim"
    assert fields_tagged("header")["clip_skip"] == "ss_clip_skip" and fields_tagged("card")["clip_skip"] == "clip skip"
    assert fields_tagged("card")["lr_scheduler"] == "LR scheduler"


def _full_facts() -> dict:
    """Every fact of a RunSummary with a value that shows (a LoRA with every optional row on)."""
    from dataclasses import fields

    from sdlora.output.facts import RunSummary, own_settings

    values = dict(base_model="org/base", base_sha256="ab" * 32, base_legacy_hash="12345678", family="SD 1.x", kind="text-to-image", rank=4, alpha=8.0, lora_type="dora",
                  rslora=True, init="pissa", target_modules=["to_q", "to_k"], train_text_encoder=True, steps=10,
                  epochs=2, train_batch_size=2, gradient_accumulation_steps=3, learning_rate=1e-4,
                  lr_scheduler="cosine", resolution=512, mixed_precision="bf16", save_precision="fp16",
                  dataset="data", num_images=5, seed=7, buckets="512x512 (5)", masked_loss=True,
                  caption_ops="shuffled", repeat_folders="5 images in N_name folders", best_val_loss="0.1 at step 5",
                  vae="org/vae", zero_terminal_snr=True, quantize_base="nf4", dataset_dirs={"d": {"n_repeats": 2}},
                  architecture="stable-diffusion-v1", prediction_type="epsilon", title="t", trigger_phrase="sks",
                  extra_tags=["x"], base_model_in_front_matter=True, base_is_local=False, samples=[], repo_id=None,
                  example_prompt="a cat", kohya_file="t.safetensors", license="openrail",
                  settings={**{n: "set" for n in own_settings()}, "clip_skip": 2})  # every tagged setting no fact names
    assert set(values) == {f.name for f in fields(RunSummary)}, "a RunSummary fact without a value here"
    return RunSummary(**values).facts()


def test_card_rows_and_header_keys_come_from_the_declarations():
    """The card's settings table and the header write exactly what the settings' card=/header= tags and the other
    facts' declarations (output/facts.py) list, in declaration order: no second, hand-written list."""
    from dataclasses import fields

    from sdlora.output import facts, modelcard, weights
    from sdlora.training.config import fields_tagged

    labels, keys = facts.card_labels(), facts.header_keys()
    settings = {f.metadata.get("setting") for f in fields(facts.RunSummary)} - {None}
    # every tagged setting is on the card / in the header: as a fact, or as itself (facts.own_settings)
    assert set(fields_tagged("card")) <= settings | set(labels) and set(fields_tagged("header")) <= settings | set(keys)
    assert labels["rank"] == fields_tagged("card")["rank"] and keys["resolution"] == fields_tagged("header")["resolution"]
    info = _full_facts()
    card = modelcard.render(info)
    rows = [line.split(" | ")[0][2:] for line in card.split("## Training settings")[1].splitlines()
            if line.startswith("| ") and not line.startswith("| setting")]
    assert rows == list(labels.values())
    header = weights.header(info)
    declared = {k for ks in keys.values() for k in ks}
    assert declared | {"sdlora_version", "modelspec.sai_model_spec", "modelspec.implementation",
                       "modelspec.date"} == set(header)
    assert header["ss_network_dim"] == "4" and header["ss_resolution"] == "(512, 512)"
    assert header["ss_network_module"] == "lycoris.kohya" and header["modelspec.tags"] == "x"
    # a fact left empty leaves its row and key out
    quiet = modelcard.render({**info, "quantize_base": None}), weights.header({**info, "quantize_base": None})
    assert "| quantized base |" not in quiet[0] and "sdlora_quantize_base" not in quiet[1]


def test_a_tagged_setting_needs_no_other_line_to_reach_the_card_and_header(monkeypatch):
    """A setting given card=/header= tags (here gradient_checkpointing, as if declared so) is on the card and in the
    header as it was set, after the facts, with no line in output/facts.py; None, False or its default leaves it out."""
    from dataclasses import fields

    from sdlora.output import facts, modelcard, weights
    from sdlora.training import config

    real = config.fields_tagged
    extra = {"card": {"gradient_checkpointing": "gradient checkpointing"},
             "header": {"gradient_checkpointing": "ss_gradient_checkpointing"}}
    monkeypatch.setattr(facts, "fields_tagged", lambda tag: real(tag) | extra.get(tag, {}))
    assert facts.own_settings()[0] == "clip_skip" and "gradient_checkpointing" in facts.own_settings()
    info = {**_full_facts(), "gradient_checkpointing": True}
    card = modelcard.render(info)
    assert card.index("| quantized base |") < card.index("| gradient checkpointing | True |")
    assert weights.header(info)["ss_gradient_checkpointing"] == "True"  # kohya's str(bool)
    fact_names = {f.name for f in fields(facts.RunSummary)}
    off = facts.RunSummary(**{**{k: v for k, v in _full_facts().items() if k in fact_names},
                              "settings": {"gradient_checkpointing": False}})
    assert "gradient_checkpointing" not in off.facts()
    plain = {k: v for k, v in _full_facts().items() if k in fact_names}
    at_default = facts.RunSummary(**{**plain, "settings": {"lr_warmup_steps": 500, "lr_power": 2.0}})
    assert "lr_warmup_steps" not in at_default.facts() and at_default.facts()["lr_power"] == 2.0
