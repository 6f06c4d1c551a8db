"""The tables and figures the report renders, in the order index.md shows them.

Adding a table or figure = one module here defining SPEC (see pipelines/report/model.py for the interface;
pipelines/report/comparison.py for the baseline-vs-GAL-over-seeds kind, pipelines/report/over_seeds.py
for what the classification specs share) + one line below + its paper numbers in
pipelines/report/paper.yaml. A spec whose runs are missing is skipped with a note in index.md; runs that are
present but inconsistent make the report fail.
"""
from pipelines.report.specs import (beyond, fig4, fig5, fig6, fig7, fig8a, fig8b, precision, protocol, table1, table2, table3,
                                    table4, table5, table6, table7, table8, width_one)

SPECS = [
    table1.SPEC,
    table2.SPEC,
    table3.SPEC,
    table4.SPEC,
    table5.SPEC,
    protocol.SPEC,      # the protocol study beside Table V
    protocol.FIGURE,
    width_one.SPEC,     # h's gradient and movement at output width 1, beside Table V
    table6.SPEC,
    table7.SPEC,
    table8.SPEC,
    fig4.SPEC,
    fig5.SPEC,
    fig6.SPEC,
    precision.SPEC,     # float32 vs float64 on GAL's remainder at each paper setting, beside Fig. 6
    fig7.SPEC,
    fig8a.SPEC,
    fig8b.SPEC,
    beyond.SPEC,        # ours, not the paper's: can the adjuster learn where the published one cannot?
    beyond.FIGURE,
]
