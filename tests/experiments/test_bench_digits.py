"""bench_digits' table: the reference row comes first and the samplers reaching its band are
listed fewest NFE first (the sampling itself is what tests/run/test_sample_metrics.py checks)."""

from experiments import bench_digits


def _row(sampler, steps, nfe, fid, std=None):
    return dict(sampler=sampler, steps=steps, guidance=1.0, nfe=nfe, seconds=1.0, fid=fid,
                fid_std=std, kid=0.0, seeds=2)  # fmt: skip


def test_the_table_lists_the_samplers_within_the_reference_band_by_nfe():
    rows = [
        _row("ancestral", 1000, 1000, 10.0, 1.0),
        _row("ddim eta=0", 10, 10, 30.0, 2.0),
        _row("DPM-Solver++ 2M", 20, 20, 11.5, 1.0),
        _row("ode heun", 10, 20, 11.9, 0.5),
    ]
    meta = dict(num=297, reference_num=297, date="d", machine="m", model="w", step=2500,
                classifier_test_accuracy=0.98, seeds=2, guidance_note="")  # fmt: skip
    table = bench_digits.markdown(rows, (5.0, 0.5), meta)
    assert "FID <= 12.00" in table and "| ddim eta=0 | 1 | 10 | 10 | 1.00 | 30.00 | 2.00 |" in table
    hits = table.split("fewest NFE first:")[1]
    assert "ddim" not in hits
    assert hits.index("DPM-Solver++ 2M") < hits.index("ode heun") < hits.index("ancestral")
