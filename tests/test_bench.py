"""bench.py: its FLOP count of a translation step against torch's own counter of every matrix
multiply it runs (torch.utils.flop_counter), forward and backward; its command line."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import build
import train


@pytest.mark.parametrize("S, T, enc, dec", [(7, 9, 2, 2), (5, 3, 3, 3)])
def test_nmt_matmul_flops_match_torchs_counter(S, T, enc, dec):
    cfg = train.get_config(['--model', 'nmt', '--embed', 'standard', 'd_model=32', 'n_head=4',
                            'd_ff=48', f'enc_layers={enc}', f'dec_layers={dec}', 'dropout=0',
                            'dropatt=0', 'vocab_size=[40,56]'])
    torch.manual_seed(0)
    model = build.model(cfg, (40, 56))
    B = 3
    src = torch.randint(4, 40, (B, S))          # no padding: every position is counted
    tgt = torch.randint(4, 56, (B, T + 1))      # the decoder reads T of them
    with FlopCounterMode(display=False) as fc:
        loss, _ = model(src, tgt)
        loss.backward()
    parts = bench.nmt_matmul_flops(cfg, B, S, T, 56)
    assert sum(parts.values()) == fc.get_total_flops()
    assert parts['output'] == 6 * B * T * 32 * 56 and min(parts.values()) > 0


def test_bench_flags_and_trains_settings_are_told_apart(capsys):
    cfg, args = bench.parse(['--config', 'cpu_ptb_txl', '--warmup', '7', '--steps', '3', '--what', 'io'])
    assert (cfg['warmup'], args.warmup_steps, args.steps, args.what) == (7, 5, 3, 'io')
    for argv, match in ((['--what', 'nope'], "invalid choice: 'nope'"), (['--steps', '0'], '--steps must be'),
                        (['--steps', 'abc'], "invalid int value: 'abc'")):
        with pytest.raises(SystemExit) as e:
            bench.parse(argv)
        assert e.value.code == 2 and match in capsys.readouterr().err
