"""Results report: results records -> RESULTS.md, plots against epsilon, sample mosaics, published
numbers beside ours (`dp-diffusion report`).

Not to be confused with `dp_diffusion.privacy.report`, a single run's privacy report.

- :mod:`records`   reading results files / run dirs; the `privacy.epsilon_is_guarantee` field
- :mod:`tables`    seeds pooled into markdown tables (also `experiments/aggregate.py`'s table)
- :mod:`plots`     FID / accuracy against epsilon, the grid mosaic (matplotlib, Agg)
- :mod:`published` the papers' numbers (`published.yaml`) and where they match ours
- :mod:`build`     the command
"""

from dp_diffusion.report.build import main, write_report
from dp_diffusion.report.records import EPSILON_IS_GUARANTEE, load_records, not_a_guarantee

__all__ = ["EPSILON_IS_GUARANTEE", "load_records", "main", "not_a_guarantee", "write_report"]
