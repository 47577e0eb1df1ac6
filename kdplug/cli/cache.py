"""``kdplug cache``: run the teachers once and keep their outputs in a teacher store."""

from __future__ import annotations

import sys
from typing import Any

import click

from kdplug import distributed
from kdplug.cli.config_file import config_option
from kdplug.cli.options import (
    allow_code_option,
    allow_pickle_option,
    batch_size_option,
    calibration_option,
    classes_option,
    config_from,
    device_option,
    nproc_option,
    teachers_option,
)


@click.command("cache")
@teachers_option()
@click.option(
    "--data",
    multiple=True,
    required=True,
    metavar="DATA",
    help="Data to cache (a DATA spec); repeat for several splits, e.g. labeled and unlabeled.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The store directory.")
@click.option(
    "--topk",
    type=click.IntRange(min=1),
    default=None,
    help="Keep each teacher's K most probable classes per view (default: all classes).",
)
@click.option(
    "--views",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Views per row: view 0 the plain input, the others random augmentations.",
)
@click.option(
    "--augment",
    default=None,
    metavar="KEY=VALUE,...",
    help="Augmentation of views 1..V-1: scale=LOW;HIGH, ratio=LOW;HIGH, hflip=P, "
    "brightness=B, contrast=C (default: scale=0.08;1, ratio=0.75;1.333, hflip=0.5).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float16", "float32"]),
    default="float16",
    show_default=True,
    help="How the log-probabilities are stored.",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed of the views' random parameters.",
)
@classes_option("Class names (default: the first DATA's).")
@calibration_option
@batch_size_option
@device_option
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    help="Rows per shard (the unit written to disk and skipped on --resume).",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run into OUT.")
@click.option("--overwrite", is_flag=True, help="Replace whatever OUT holds.")
@click.option(
    "--force",
    is_flag=True,
    help="With --resume: keep the finished shards although a teacher file or DATA changed.",
)
@click.option(
    "--skip-bad-rows",
    is_flag=True,
    help="Mark views where a teacher gives NaN/Inf (distill drops them) instead of failing.",
)
@allow_pickle_option
@allow_code_option
@config_option
@nproc_option
def cache_command(nproc_per_node: int | None, **params: Any) -> None:
    """Cache the teachers' outputs on DATA (V views per row) into the store OUT.

    \b
    kdplug cache --teacher torchscript:t1.pt --teacher torchscript:t2.pt \\
        --data disk:data/train --data disk:data/raw --out store --topk 5 --views 4
    kdplug distill --store store --student timm:resnet10t --train disk:data/train \\
        --unlabeled disk:data/raw --out runs/r10t
    """
    from kdplug.engines.cache import CacheConfig, run_cache

    if nproc_per_node is not None:
        sys.exit(distributed.launch(nproc_per_node, sys.argv[1:]))
    config = config_from(CacheConfig, params)
    with distributed.session(config.device):
        info = run_cache(config)
        if not distributed.is_main():
            return
    rows = sum(split["rows"] for split in info["splits"])
    click.echo(
        f"cached {len(info['teachers'])} teacher(s) x {info['views']} view(s) on {rows} rows "
        f"({len(info['splits'])} split(s)) -> {config.out}"
    )


COMMANDS = [cache_command]
