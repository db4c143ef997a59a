"""LightningCLI entry point: every callback of lightning_compress can be configured from YAML with `class_path`.

python examples/cli.py fit --config examples/prune_lenet.yaml
"""

from lightning.pytorch.cli import LightningCLI

from lightning_compress.demos import FashionMNISTDataModule, ImageClassifier


def main() -> None:
    LightningCLI(ImageClassifier, FashionMNISTDataModule, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
