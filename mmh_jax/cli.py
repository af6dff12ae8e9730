"""The ``mmh-jax`` command line.

Subcommands:

* ``mmh-jax demo`` (same as ``mmh-jax demo von-mises``): the paper's von Mises
  mixture experiment (Section 4, Figure 4) on CPU in under a minute.
* ``mmh-jax demo digits``: the image-scale memorization demo on scikit-learn's 8x8
  digits.
* ``mmh-jax demo prompts``: a text-to-image model trained on the shapes world, with planted
  memorization; detection, attribution, mitigation and the guarded sampler against ground truth.
* ``mmh-jax convert unet2d FOLDER -o OUT.safetensors``: convert a local diffusers
  ``UNet2DModel`` folder (or a pipeline folder with ``unet/``, its noise schedule read from
  the scheduler config saved beside it) into one safetensors file that
  :func:`mmh_jax.models.load_unet2d` reads without torch.
* ``mmh-jax convert iddpm CHECKPOINT.pt -o OUT.safetensors [--image-size 32 ...]``: convert
  an improved-diffusion checkpoint, given the flags it was trained with (improved-diffusion's
  defaults otherwise), into one safetensors file that :func:`mmh_jax.models.load_iddpm` reads
  without torch or flags.
* ``mmh-jax convert stable-diffusion FOLDER -o OUT.safetensors``: convert a diffusers Stable
  Diffusion pipeline folder (UNet, VAE, CLIP text encoder, tokenizer, scheduler) into one file
  that :func:`mmh_jax.models.load_stable_diffusion` reads without torch.
* ``mmh-jax convert stylegan2 NETWORK.pkl -o OUT.safetensors``: read an official
  StyleGAN2-ADA pickle without running the code it carries (``--network G|G_ema``) into one
  file that :func:`mmh_jax.models.load_stylegan2` reads without torch.
* ``mmh-jax sd detect MODEL --prompts FILE | --images FOLDER``: the paper's memorization metrics
  of Stable Diffusion (CFG vector and CFG-adjusted score norms, unconditional and conditional
  FLIPD) for every prompt or image-caption pair, with histograms, AUROCs and TPR at 1% FPR.
* ``mmh-jax sd attribute MODEL --prompt TEXT | --prompts FILE``: which prompt tokens drive the
  memorization metrics A^CFG, A^sCFG, A^FLIPD (token attributions, Figures 7a and 11).
* ``mmh-jax sd mitigate MODEL --prompts FILE``: sample-time mitigation by rephrasing the most
  attributed tokens, uniform tokens, random token addition or embedding optimisation, with SSCD
  similarity and CLIP score (Figures 7c, 9, 10).
* ``mmh-jax gan lid MODEL``: Jacobian-rank LID of class-balanced StyleGAN2-ADA samples with
  the paper's threshold (Figure 5a-b).
* ``mmh-jax cifar10 run --train DATA --model CKPT --arch {iddpm,unet2d,stylegan2}`` and
  ``mmh-jax cifar10 report OUT --labels LABELS.csv``: the paper's CIFAR-10 analysis (Figure 5,
  Figure 8): LID_theta, nearest training images, LID_*, then detection metrics from hand labels.

The conversions are strict (every tensor must match the architecture) and print a summary
table. Errors in the input are reported as one line on stderr with exit status 2 (a checkpoint
that does not match its architecture: exit status 1, with the full listing of mismatching
keys); Ctrl-C exits with status 130 and leaves no half-written output file.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main", "build_parser"]

DEMOS = ("von-mises", "digits", "prompts")


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are a single line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full ``mmh-jax`` argument parser."""
    from mmh_jax.experiments import digits, prompt_world, von_mises

    parser = _Parser(
        prog="mmh-jax",
        description="Memorization in generative models read off local intrinsic dimension "
        "(Ross et al., ICLR 2025), in JAX.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    demo = commands.add_parser(
        "demo",
        help=f"run a self-contained CPU demo: {', '.join(DEMOS)} (default: {DEMOS[0]})",
        description=f"Run a self-contained demo, one of {', '.join(DEMOS)}. `mmh-jax demo` (or "
        f"`mmh-jax demo --seed 1 ...`) runs {DEMOS[0]}; `mmh-jax demo DEMO --help` lists a demo's "
        "flags.",
    )
    which = demo.add_subparsers(dest="demo", metavar="DEMO", parser_class=_Parser)
    vm = which.add_parser(
        "von-mises",
        help="the paper's Figure 4: OD-Mem and DD-Mem on a von Mises mixture (default, ~1 min on CPU)",
        description="Train a small diffusion model on 100 points from a von Mises mixture (circle, LID* = 1) "
        "plus a point mass at the origin (LID* = 0), sample it, estimate LID_theta with FLIPD and the normal "
        "bundle and LID_* with local PCA, and label samples OD-Mem / DD-Mem / not memorized "
        "(paper, Section 4, Figure 4). This is what `mmh-jax demo` runs; `mmh-jax demo digits` runs the "
        "image-scale demo.",
    )
    von_mises.add_arguments(vm)
    dg = which.add_parser(
        "digits",
        help="image-scale demo on scikit-learn's 8x8 digits with duplicated and rare training images",
        description="Train a small convolutional diffusion model on scikit-learn's 8x8 digits where some "
        "images are duplicated many times (DD-Mem) and a few classes have very few images (OD-Mem), sample "
        "it, find each sample's nearest training image (calibrated l2) and show that FLIPD separates "
        "memorized from novel samples (AUROC of -FLIPD).",
    )
    digits.add_arguments(dg)
    pw = which.add_parser(
        "prompts",
        help="a text-to-image model that really memorizes (the shapes world): detection, "
        "attribution, mitigation and the guarded sampler against ground truth (~10 min training)",
        description="Train (or reuse) a small Stable-Diffusion-shaped model on the shapes world, a "
        "captioned image world made in code with planted memorization (verbatim duplicates with "
        "trigger words, templates, rare captions), then measure against ground truth: detection "
        "of memorized prompts by the CFG norm, the CFG-adjusted score norm and conditional FLIPD "
        "(paper Figures 3, 6), token attribution (Figures 7a, 11), mitigation by rephrasing, "
        "random token addition and embedding optimisation (Figure 7c) and the guarded sampler.",
    )
    prompt_world.add_arguments(pw)
    _add_convert_parsers(commands)
    _add_sd_parsers(commands)
    _add_gan_parsers(commands)
    _add_cifar10_parsers(commands)
    _add_score_parsers(commands)
    return parser


def _add_tools(commands: Any, name: str, *, dest: str, metavar: str = "TOOL", **kwargs: Any) -> Any:
    """Add the command ``name`` (``help``, ``description``: ``kwargs``) and return its
    subcommands, one of which must be given (its name in ``args.<dest>``)."""
    tools = commands.add_parser(name, **kwargs).add_subparsers(
        dest=dest, metavar=metavar, parser_class=_Parser
    )
    tools.required = True
    return tools


def _add_tool(
    tools: Any, name: str, add_arguments: Any, *, help: str, description: str, example: str
) -> None:
    """Add the subcommand ``name`` to ``tools``: its one-line ``help``, its ``description``
    wrapped and its ``example`` verbatim (:func:`_described`), its arguments by
    ``add_arguments(parser)``."""
    add_arguments(tools.add_parser(name, help=help, **_described(description, example)))


def _add_score_parsers(commands: Any) -> None:
    """The ``score`` command (``--config``) and its ``merge`` subcommand."""
    score = commands.add_parser(
        "score",
        help="score many items on every device and host (FLIPD, normal bundle, CFG "
        "norms, ...) into resumable Parquet parts",
        **_described(
            "Compute the columns a TOML config names (FLIPD at several t0, normal bundle, CFG "
            "norms, Jacobian rank, nearest reference item, PNG size) for every item of an input "
            "(image folder, .npy/.npz, webdataset tar shards, Parquet, prompts) on all devices "
            "of all hosts (jax.distributed), writing one row per item. Chunks are written "
            "exactly once; a rerun resumes. Bad items go to an errors table. "
            "`mmh-jax score --template` prints every config key; tpu_configs/ has launch "
            "configs for TPU pods, multi-GPU nodes and Slurm.",
            "mmh-jax score --config scores.toml --dry-run\n"
            "mmh-jax score --config scores.toml\n"
            "mmh-jax score merge scores/",
        ),
    )
    score.add_argument("--config", type=Path, metavar="FILE.toml", help="the run's config")
    score.add_argument(
        "--dry-run",
        action="store_true",
        help="show the plan and an estimated time from a short warm-up; write nothing",
    )
    score.add_argument(
        "--template",
        action="store_true",
        help="print every config key with its default and meaning, and exit",
    )
    score.add_argument(
        "--process-id",
        type=int,
        metavar="N",
        help="this process's index (sets [distributed] initialize and process_id)",
    )
    score.add_argument(
        "--num-processes",
        type=int,
        metavar="N",
        help="number of processes (sets [distributed] num_processes)",
    )
    score.add_argument(
        "--coordinator-address",
        metavar="HOST:PORT",
        help="process 0's address (sets [distributed] coordinator_address)",
    )
    score.add_argument("--quiet", action="store_true", help="no progress bar")
    tools = score.add_subparsers(dest="score_command", metavar="TOOL", parser_class=_Parser)
    merge = tools.add_parser(
        "merge",
        help="merge a run's parts into scores.parquet and errors.parquet",
        description="Check every part against its manifest and write DIR/scores.parquet and "
        "DIR/errors.parquet (rows sorted by item index).",
    )
    merge.add_argument("dir", type=Path, metavar="DIR", help="the run's output folder")
    merge.add_argument(
        "--allow-partial",
        action="store_true",
        help="merge the finished chunks even if some are missing",
    )


def _add_sd_parsers(commands: Any) -> None:
    """The ``sd`` command and its ``detect``, ``attribute`` and ``mitigate`` subcommands."""
    from mmh_jax.experiments import detector_benchmark, sd_mitigation, stable_diffusion

    tools = _add_tools(
        commands,
        "sd",
        dest="sd_command",
        help="Stable Diffusion: memorization detection, token attribution, mitigation",
        description="Memorization tools for Stable Diffusion (v1.x, 2.x) from a local diffusers "
        "pipeline folder or a converted file; nothing is downloaded.",
    )
    _add_tool(
        tools,
        "detect",
        stable_diffusion.add_arguments,
        help="score prompts or image-caption pairs with the paper's memorization metrics",
        description="Score prompts (generating --images-per-prompt images each with DDIM and "
        "classifier-free guidance) or real image-caption pairs with the memorization metrics "
        "of the paper (Section 3.2, Figure 6): Wen et al.'s CFG vector norm, the "
        "CFG-adjusted score norm, and FLIPD of the unconditional and of the CFG-conditional "
        "model in latent space. Writes results.parquet/.csv (resumable: a rerun with the "
        "same --out skips what is done), density histograms by label (Figure 6), the "
        "CFG-adjusted score vs CFG vector scatter (Figure 3), and with labels the AUROC and "
        "TPR at 1% FPR of every metric.",
        example="mmh-jax sd detect ./stable-diffusion-v1-5 --prompts memorized.jsonl -o sd-detect",
    )
    _add_tool(
        tools,
        "attribute",
        sd_mitigation.add_attribute_arguments,
        help="which prompt tokens drive memorization (token attributions, Figures 7a/11)",
        description="Attribute the memorization metrics of each prompt to its tokens (paper, Section "
        "4.2, Appendix D.2, Figures 7a and 11): generate DDIM trajectories of the prompt, "
        "take the gradient of A^CFG (Wen et al.'s CFG vector norm), A^sCFG (the CFG-adjusted "
        "score norm) or A^FLIPD (the CFG-conditional FLIPD) with respect to the prompt "
        "embedding, and report its L2 norm per token averaged over images and steps (the "
        "public code's defaults: 4 images x all steps for the CFG metrics, 1 image x steps "
        "10-49 of 50 for FLIPD). Writes attributions.parquet/.csv (one row per prompt, "
        "metric and token) and attributions.png (the tokens coloured by attribution).",
        example='mmh-jax sd attribute ./stable-diffusion-v1-5 --prompt "The Great Wave off '
        'Kanagawa by Katsushika Hokusai" --metric flipd cfg -o sd-attribute',
    )
    _add_tool(
        tools,
        "mitigate",
        sd_mitigation.add_mitigate_arguments,
        help="rephrase memorized prompts (or optimise their embeddings) and score the new images",
        description="Mitigate memorization at sample time (paper, Section 4.2, Appendix D.3-D.5, Figures "
        "7c, 9, 10). For every prompt, method, k and repeat: attribution (k tokens drawn from "
        "softmax(attribution / 0.1) with 1e-3 smoothing, their words rephrased), uniform (k "
        "tokens drawn uniformly, rephrased), rta (k random CLIP vocabulary words inserted, "
        "Somepalli et al.), embedding (AdamW on the prompt embedding: A^FLIPD raised at step "
        "40, lr 0.05, 20 updates; A^CFG lowered at step 0 to ||eps_c - eps_u|| <= 3, as Wen "
        "et al.), and the interventions attention-rescale (Ren et al.: the beginning token's "
        "cross-attention logits scaled) and nemo (Hintersdorf et al.: outlier value neurons "
        "switched off); then the new image from the same starting noise as the original, its SSCD "
        "similarity to the memorized training image (--reference-images; else to the "
        "original generation) and its CLIP score against the original prompt. The rephraser "
        "is offline synonym substitution by default, or any OpenAI-compatible chat endpoint "
        "(--rephraser chat --chat-url URL, key in $OPENAI_API_KEY); a failing rephrasing "
        "keeps its prompt, is reported, and the run goes on. Writes results.parquet/.csv, "
        "summary.csv, originals.csv, attributions.csv, grid.png (Figure 10) and, with "
        "--sscd and --clip, tradeoff.png (Figure 7c).",
        example="mmh-jax sd mitigate ./stable-diffusion-v1-5 --prompts memorized.jsonl --sscd "
        "sscd_disc_large.torchscript.pt --clip ./clip-vit-large-patch14 --reference-images "
        "./laion-memorized -o sd-mitigate",
    )
    _add_tool(
        tools,
        "benchmark-detectors",
        detector_benchmark.add_arguments,
        help="compare the memorization detectors of the literature on labelled prompts",
        description="Run every memorization detector of the literature (Ren et al.'s cross-attention "
        "entropy and beginning/end-token attention, Chen et al.'s bright ending, "
        "Hintersdorf et al.'s NeMo value-neuron outliers, Jeon et al.'s sharpness, "
        "Webster's one-step edge agreement, Carlini et al.'s generation clusters) and the "
        "paper's metrics (CFG norm, CFG-adjusted score norm, conditional FLIPD) on one "
        "labelled prompt file; report AUROC and TPR at 1% FPR with bootstrap CIs, per "
        "memorization kind when the file has a 'kind' field, and the cost of each (UNet "
        "evaluations and seconds per prompt, and relative to the generation). Writes "
        "detectors.csv/.md, prompts.csv and roc.png.",
        example="mmh-jax sd benchmark-detectors ./stable-diffusion-v1-5 --prompts labelled.jsonl "
        "-o sd-benchmark",
    )


def _add_gan_parsers(commands: Any) -> None:
    """The ``gan`` command and its ``lid`` subcommand."""
    from mmh_jax.experiments import cifar10_gan

    tools = _add_tools(
        commands,
        "gan",
        dest="gan_command",
        help="GANs (StyleGAN2-ADA): Jacobian-rank LID of samples",
        description="Memorization tools for StyleGAN2-ADA generators from an official .pkl "
        "(read as data, never executed) or a converted file; nothing is downloaded.",
    )
    _add_tool(
        tools,
        "lid",
        cifar10_gan.add_arguments,
        help="LID of generated samples from the rank of the generator's Jacobian (Figure 5a-b)",
        description="Generate class-balanced samples (sample i: the official generate.py's seed "
        "--seed + i, class i mod c_dim), compute the singular values of the Jacobian of "
        "each sample with respect to its latent, threshold all of them at their pooled "
        "--percentile (the paper's 10th, Appendix C.1) and count those above: the LID "
        "estimate. Writes results.parquet/.csv, spectra.npy, the histogram of Figure 5b "
        "and the lowest- and highest-LID samples (Figure 5a); resumable: a rerun with the "
        "same --out computes only what is missing.",
        example="mmh-jax gan lid cifar10.pkl -n 50000 -o cifar10-gan-lid",
    )


def _add_cifar10_parsers(commands: Any) -> None:
    """The ``cifar10`` command and its ``run`` and ``report`` subcommands."""
    from mmh_jax.experiments import cifar10

    tools = _add_tools(
        commands,
        "cifar10",
        dest="cifar10_command",
        help="the paper's CIFAR-10 memorization analysis (Figure 5, Figure 8)",
        description="The paper's CIFAR-10 analysis on your training images and checkpoint "
        "(iDDPM, diffusers UNet2D or StyleGAN2-ADA): sample, LID_theta, nearest training "
        "images, LID_*, PNG complexity; then detection metrics from hand labels.",
    )
    _add_tool(
        tools,
        "run",
        cifar10.add_run_arguments,
        help="generate, estimate LID_theta and LID_*, retrieve nearest training images",
        description="Generate samples (DDIM for diffusion models, class-balanced latents for "
        "StyleGAN2-ADA), estimate LID_theta (FLIPD t0=0.05 or the normal bundle t0=0.1 "
        "for diffusion models; Jacobian rank at the pooled 10th percentile for StyleGAN), "
        "find each sample's nearest training image by calibrated l2 (and SSCD with "
        "--sscd), estimate that image's LID_* with local PCA, and the PNG length. Writes "
        "results.parquet/.csv, pairs_<distance>.png and to_label.csv. Diffusion models: "
        "only converted .safetensors files (or, for unet2d, diffusers folders), which "
        "carry their own flags.",
        example="mmh-jax cifar10 run --train cifar10-train/ --model cifar10.pkl --arch stylegan2 "
        "-n 50000 -o cifar10-gan",
    )
    _add_tool(
        tools,
        "report",
        cifar10.add_report_arguments,
        help="detection metrics and figures from hand labels of a run",
        description="Join hand labels (exact / reconstructive / not) with a run's results and write "
        "histograms.png (Figure 5 / 8), roc.png and detection.csv: AUROC, TPR at 1% FPR "
        "and AP with bootstrap 95% CIs of LID_theta, LID_* and their PNG-normalised "
        "variants (memorized = exact or reconstructive; small LID = memorized).",
        example="mmh-jax cifar10 report cifar10-gan --labels cifar10-gan/to_label.csv",
    )


def _add_iddpm_option(
    group: Any, name: str, kind: Any, metavar: str | None, text: str, default: Any
) -> None:
    """Add one improved-diffusion flag; it is in the namespace only when given."""
    option = "--" + name.replace("_", "-")
    if name == "channel_mult":
        from mmh_jax.models.iddpm import CHANNEL_MULT

        shown = "improved-diffusion's for --image-size, " + "; ".join(
            f"{size}: {','.join(map(str, mult))}" for size, mult in CHANNEL_MULT.items()
        )
    elif isinstance(default, bool):
        shown = "--" + ("" if default else "no-") + name.replace("_", "-")
    else:
        shown = str(default)
    common = dict(dest=name, default=argparse.SUPPRESS, help=f"{text} (default: {shown})")
    if kind is bool:
        group.add_argument(option, action=argparse.BooleanOptionalAction, **common)
    elif isinstance(kind, tuple):
        group.add_argument(option, choices=kind, **common)
    else:
        from mmh_jax.experiments.common import finite_float

        group.add_argument(
            option, type=finite_float if kind is float else kind, metavar=metavar, **common
        )


def _described(description: str, example: str) -> dict[str, Any]:
    """``add_parser`` arguments for a description wrapped as usual and a verbatim example."""
    return dict(
        description=textwrap.fill(description, 79),
        epilog=f"example: {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_convert_parsers(commands: Any) -> None:
    """The ``convert`` command and its ``unet2d`` and ``iddpm`` subcommands."""
    from mmh_jax.experiments.convert import IDDPM_DIFFUSION_OPTIONS, IDDPM_MODEL_OPTIONS
    from mmh_jax.models.iddpm import DIFFUSION_FLAGS, MODEL_FLAGS

    kinds = _add_tools(
        commands,
        "convert",
        dest="architecture",
        metavar="ARCHITECTURE",
        help="convert a PyTorch checkpoint (diffusers UNet2DModel, improved-diffusion, a "
        "Stable Diffusion pipeline, a StyleGAN2-ADA pickle) to safetensors for the JAX loaders",
        description="Convert a local PyTorch checkpoint into one .safetensors file holding the "
        "Flax parameters, the architecture's config and (diffusion models) the noise schedule, "
        "which mmh_jax.models.load_unet2d / load_iddpm / load_stable_diffusion / load_stylegan2 "
        "read back without torch. The conversion is strict: a checkpoint that does not match its architecture is refused with a listing of "
        "the missing, unexpected and misshapen tensors. Nothing is downloaded.",
    )
    _add_converter(
        kinds,
        "unet2d",
        metavar="FOLDER",
        source="the diffusers model or pipeline folder",
        help="a diffusers UNet2DModel folder (or a pipeline folder with unet/)",
        description="Convert a diffusers UNet2DModel saved with save_pretrained: a folder with "
        "config.json and diffusion_pytorch_model.safetensors (or .bin, which needs torch), or a "
        "pipeline folder holding it under unet/. The noise schedule comes from the "
        "scheduler_config.json saved beside the model (in the folder, its scheduler/ child, "
        "or the pipeline's scheduler/). The output holds the parameters, the config and the "
        "schedule: load_unet2d(OUT) needs neither torch nor the folder.",
        example="mmh-jax convert unet2d ./ddpm-cifar10-32 -o ddpm-cifar10-32.safetensors",
    )
    iddpm = _add_converter(
        kinds,
        "iddpm",
        metavar="CHECKPOINT",
        source="the checkpoint (.pt, .pth, .bin, .ckpt or .safetensors)",
        help="an improved-diffusion (Nichol & Dhariwal 2021) checkpoint, with its flags",
        description="Convert an improved-diffusion UNetModel checkpoint (a state dict saved with "
        "torch.save, read with weights_only=True, or the same as .safetensors). Pass the "
        "MODEL_FLAGS and DIFFUSION_FLAGS it was trained with, dashes for underscores "
        "(--image-size 32 for --image_size 32, --learn-sigma / --no-learn-sigma for "
        "--learn_sigma True / False); flags not given take improved-diffusion's defaults, "
        "shown below. The sampling-only flags do not change the conversion and are not "
        "taken. The flags are stored in the output: load_iddpm(OUT) needs none, nor torch.",
        example="the CIFAR-10 L_hybrid model of improved-diffusion's README\n"
        "  mmh-jax convert iddpm cifar10_uncond_50M_500K.pt -o cifar10_uncond.safetensors \\\n"
        "    --image-size 32 --num-channels 128 --num-res-blocks 3 --learn-sigma \\\n"
        "    --dropout 0.3 --diffusion-steps 4000 --noise-schedule cosine",
    )
    defaults = {**MODEL_FLAGS, **DIFFUSION_FLAGS}
    for title, options in (
        ("model flags", IDDPM_MODEL_OPTIONS),
        ("diffusion flags", IDDPM_DIFFUSION_OPTIONS),
    ):
        group = iddpm.add_argument_group(title)
        for name, kind, metavar, text in options:
            _add_iddpm_option(group, name, kind, metavar, text, defaults[name])
    _add_converter(
        kinds,
        "stable-diffusion",
        metavar="FOLDER",
        source="the pipeline folder",
        help="a diffusers Stable Diffusion pipeline folder (v1.x, 2.x)",
        description="Convert a Stable Diffusion pipeline saved with save_pretrained "
        "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/; weights as "
        ".safetensors, or .bin, which needs torch) into one file holding the three networks' "
        "parameters, their configs, the scheduler config and the tokenizer: "
        "load_stable_diffusion(OUT) needs neither torch nor the folder.",
        example="mmh-jax convert stable-diffusion ./stable-diffusion-v1-5 -o sd15.safetensors",
    )
    gan = _add_converter(
        kinds,
        "stylegan2",
        metavar="CHECKPOINT",
        source="the .pkl (or a state dict, or a converted .safetensors file)",
        help="an official StyleGAN2-ADA network pickle, read without running its code",
        description="Convert a StyleGAN2-ADA generator: an official network pickle (a training "
        "snapshot or a released .pkl such as cifar10.pkl), read by a restricted reader that "
        "never imports or executes what the file names (the official loader runs the "
        "source code stored in the file); a plain state dict of the generator "
        "(.safetensors, or .pt/.pth read with weights_only=True) with --init-kwargs; or a "
        "converted file. The output holds the parameters and the generator's constructor "
        "arguments: load_stylegan2(OUT) needs neither torch nor the pickle.",
        example="mmh-jax convert stylegan2 cifar10.pkl -o stylegan2-cifar10.safetensors",
    )
    gan.add_argument(
        "--network",
        choices=("G", "G_ema"),
        default="G_ema",
        help="which generator of a training snapshot (default %(default)s)",
    )
    gan.add_argument(
        "--init-kwargs",
        metavar="JSON",
        type=Path,
        help="for a plain state dict: a JSON file with the Generator's constructor "
        "arguments (z_dim, c_dim, w_dim, img_resolution, img_channels, "
        "mapping_kwargs, synthesis_kwargs)",
    )


def _add_converter(
    kinds: Any,
    name: str,
    *,
    metavar: str,
    source: str,
    help: str,
    description: str,
    example: str,
) -> Any:
    """Add the conversion ``name`` (:func:`_add_tool`'s ``help``, ``description`` and
    ``example``) with its input ``path`` (shown as ``metavar``, described by ``source``) and
    ``-o/--output``; returns its parser."""
    parser = kinds.add_parser(name, help=help, **_described(description, example))
    parser.add_argument("path", metavar=metavar, type=Path, help=source)
    parser.add_argument(
        "-o",
        "--output",
        metavar="OUT.safetensors",
        type=Path,
        required=True,
        help="the file to write (atomically; an existing file is replaced); its folder must exist",
    )
    return parser


def _normalise(argv: list[str]) -> list[str]:
    """Make ``demo`` without a demo name (nothing, or the von Mises demo's flags) mean ``demo
    von-mises``; ``demo --help`` lists the demos and an unknown name is answered with them."""
    if (
        argv
        and argv[0] == "demo"
        and (len(argv) == 1 or (argv[1].startswith("-") and argv[1] not in ("-h", "--help")))
    ):
        return ["demo", DEMOS[0], *argv[1:]]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mmh-jax`` console script; returns the exit status."""
    from mmh_jax.experiments.common import DemoInputError

    argv = _normalise(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            from mmh_jax.experiments import convert

            return convert.run(convert.config_from_args(args))
        if args.command == "score":
            if args.score_command is None and args.template and args.config is not None:
                parser.error("score --template prints the template and reads no --config")
            if args.score_command is None and not args.template and args.config is None:
                parser.error("score needs --config FILE.toml (or --template, or the merge tool)")
            from mmh_jax.scoring import config as scoring_config

            return scoring_config.command(args)
        if args.command == "sd":
            if args.sd_command == "attribute":
                from mmh_jax.experiments import sd_mitigation

                sd_mitigation.run_attribute(sd_mitigation.attribute_config_from_args(args))
                return 0
            if args.sd_command == "benchmark-detectors":
                from mmh_jax.experiments import detector_benchmark

                detector_benchmark.run(detector_benchmark.config_from_args(args))
                return 0
            if args.sd_command == "mitigate":
                from mmh_jax.experiments import sd_mitigation

                sd_mitigation.run_mitigate(sd_mitigation.mitigate_config_from_args(args))
                return 0
            from mmh_jax.experiments import stable_diffusion

            stable_diffusion.run(stable_diffusion.config_from_args(args))
            return 0
        if args.command == "gan":
            from mmh_jax.experiments import cifar10_gan

            cifar10_gan.run(cifar10_gan.config_from_args(args))
            return 0
        if args.command == "cifar10":
            from mmh_jax.experiments import cifar10

            if args.cifar10_command == "report":
                cifar10.report(cifar10.report_config_from_args(args))
            else:
                cifar10.run(cifar10.run_config_from_args(args))
            return 0
        if args.command == "demo":
            if args.demo == "digits":
                from mmh_jax.experiments import digits as mod
            elif args.demo == "prompts":
                from mmh_jax.experiments import prompt_world as mod
            else:
                from mmh_jax.experiments import von_mises as mod
            mod.run(mod.config_from_args(args))
            return 0
    except DemoInputError as err:
        print(f"mmh-jax: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmh-jax: interrupted; no partial output files were left behind", file=sys.stderr)
        return 130
    except OSError as err:
        print(
            f"mmh-jax: error: {err.strerror or err} ({getattr(err, 'filename', '') or ''})",
            file=sys.stderr,
        )
        return 1
    parser.error(f"unknown command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
