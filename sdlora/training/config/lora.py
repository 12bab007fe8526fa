"""Settings of the LoRA: its type, rank, alpha, initialisation and where it goes."""
from __future__ import annotations

from dataclasses import dataclass

from .declare import MUST_MATCH, setting
from ...lora.inject import UNET_TARGETS


@dataclass(frozen=True, kw_only=True)
class LoraSettings:
    rank: int = setting(4, "the LoRA's rank", resume=MUST_MATCH, card="rank", header="ss_network_dim")
    lora_alpha: float | None = setting(help="default: equal to --rank (scale 1)",  # resolved: --rank when not given
                                       resume=MUST_MATCH, card="alpha", header="ss_network_alpha")
    lora_dropout: float = setting(0.0, "dropout on the LoRA layers' input", resume=MUST_MATCH)
    lora_type: str = setting(
        "lora", "dora: weight-decomposed LoRA (peft's use_dora, diffusers' --use_dora): each output channel's "
                "magnitude trained apart from its direction; loha / lokr: LyCORIS's Hadamard / Kronecker product "
                "layers (peft's LoHa/LoKr; --rank is their rank, --lora_alpha their alpha). LoHa/LoKr files load in "
                "ComfyUI, A1111/Forge and sdlora, not in diffusers' load_lora_weights; adalora: ranks pruned during "
                "training from --adalora_init_r down to an average of --rank per layer (peft's AdaLoRA), saved as "
                "plain LoRA at each layer's final rank", choices=["lora", "dora", "loha", "lokr", "adalora"],
        resume=MUST_MATCH, card="LoRA type", header=("ss_network_module", "ss_network_args"))
    adalora_init_r: int | None = setting(help="AdaLoRA's starting rank per layer (default: 1.5 x --rank)")
    adalora_tinit: int | None = setting(help="AdaLoRA: steps at the starting ranks before pruning (default: 10%% of "
                                             "the steps)")
    adalora_tfinal: int | None = setting(help="AdaLoRA: last steps trained at the final ranks (default: 20%% of the "
                                              "steps)")
    adalora_delta_t: int = setting(1, "AdaLoRA: prune every N steps")
    init_lora_weights: str = setting(
        "gaussian", "gaussian: the adapter starts as a no-op (A random, B zero); pissa / olora: A and B start from the "
                    "layer's principal singular vectors / a QR of it, the frozen weight keeps the rest (Linear layers "
                    "only); saved files hold the change from the unmodified base, at twice the rank",
        choices=["gaussian", "pissa", "olora"], resume=MUST_MATCH, card="LoRA init")
    use_rslora: bool = setting(
        False, "rank-stabilised LoRA: scale by alpha/sqrt(rank) instead of alpha/rank; the files record the "
               "equivalent alpha (alpha*sqrt(rank)), so every loader applies the same scale", resume=MUST_MATCH,
        card="rsLoRA")
    target_modules: tuple[str, ...] = setting(  # the flag: comma-separated
        tuple(UNET_TARGETS), "comma-separated UNet module names to adapt (default: %(default)s)", resume=MUST_MATCH,
        card="target modules", header="sdlora_target_modules")
    train_text_encoder: bool = setting(
        False, "also train LoRA on the CLIP text encoder's q/k/v/out projections (both of SDXL's)", resume=MUST_MATCH,
        card="text encoder LoRA", header="sdlora_train_text_encoder")
    save_precision: str = setting("fp32", "the saved LoRA's precision", choices=["fp32", "fp16", "bf16"],
                                  card="saved precision")
