# What `snakemake --report results/report.html` shows: every table (rendered as HTML, and its csv) and every
# figure, each with its caption from workflow/report/. Tables come from config["tables"], figures from
# evit.layout.FIGURES: a new one is in the report without a rule change (a figure needs its caption file).
import html


def report_figure(fig):
    """A figure's png, flagged for the report with its caption workflow/report/figures/<fig>.rst."""
    return report(f"{RESULTS}/figures/{fig}.png", caption=f"../report/figures/{fig}.rst", category="Figures",
                  labels={"figure": fig})


def _md_paragraph(line):
    for mark, tag in (("**", "strong"), ("*", "em")):
        if len(line) > 2 * len(mark) and line.startswith(mark) and line.endswith(mark):
            return f"<p><{tag}>{html.escape(line[len(mark):-len(mark)])}</{tag}></p>"
    return f"<p>{html.escape(line)}</p>"


def table_html(md):
    """A table as `evit report` writes it in Markdown (title, pipe table, note) as a standalone HTML page."""
    lines = [line.strip() for line in md.splitlines() if line.strip()]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    header, rule, body = rows[0], rows[1], rows[2:]
    align = ["right" if r.endswith(":") else "left" for r in rule]

    def tr(row, tag):
        return "<tr>" + "".join(f'<{tag} style="text-align:{a}">{html.escape(c)}</{tag}>'
                                for c, a in zip(row, align)) + "</tr>"

    table = f"<table><thead>{tr(header, 'th')}</thead><tbody>{''.join(tr(r, 'td') for r in body)}</tbody></table>"
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    parts = [_md_paragraph(line) for line in lines[:first]] + [table]
    parts += [_md_paragraph(line) for line in lines[first + len(rows):]]
    style = ("body{font-family:sans-serif;font-size:14px;margin:1.5em}table{border-collapse:collapse}"
             "th,td{padding:3px 10px;border-bottom:1px solid #ddd;white-space:nowrap}th{border-bottom:2px solid #444}"
             "tbody tr:hover{background:#f3f3f3}")
    return f'<!doctype html><html><head><meta charset="utf-8"><style>{style}</style></head><body>' \
           + "\n".join(parts) + "</body></html>\n"


rule table_html:
    input:
        md=RESULTS + "/tables/{table}.md",
        csv=report(RESULTS + "/tables/{table}.csv", caption="../report/table.rst", category="Tables",
                   labels={"table": "{table}", "view": "csv (every column)"}),
    output:
        report(RESULTS + "/tables/{table}.html", caption="../report/table.rst", category="Tables",
               labels={"table": "{table}", "view": "html"}),
    wildcard_constraints:
        table="|".join(TABLES),
    localrule: True
    run:
        Path(output[0]).write_text(table_html(Path(input.md).read_text()))
