"""I-JEPA / StoP pretraining: ``python main_pretrain.py --fname configs/pretrain/X.yaml [k=v ...]``.

Many GPUs or nodes: ``torchrun --nproc_per_node N main_pretrain.py --fname ...``. The run folder
(``logging.folder``) receives config.yaml, log.jsonl, tensorboard events, checkpoint-last.pth
(official I-JEPA layout, resumed automatically) and results.json.
"""

from __future__ import annotations

import sys

from ijepa_toolkit.checkpoint import CheckpointError, CheckpointWriteError
from ijepa_toolkit.config import ConfigError, config_parser, parse_config
from ijepa_toolkit.engine.distributed import cleanup, init_distributed
from ijepa_toolkit.engine.logger import setup_console_logging
from ijepa_toolkit.pretrain.train import PretrainConfig, TrainingDiverged, pretrain


def main(argv=None) -> int:
    cfg, _ = parse_config(PretrainConfig, config_parser(__doc__.splitlines()[0]), argv)
    dist_info = init_distributed(cfg.meta.device)
    setup_console_logging(dist_info.is_main)
    try:
        pretrain(cfg, dist_info)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingDiverged, CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
