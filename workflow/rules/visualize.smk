# The paper's Figure 3: images and the patches kept after each reorganizing block.


rule visualize:
    input:
        config=f"{WF.runs}/{config['visualize']['experiment']}/config.yaml",
        result=WF.result_file(config["visualize"]["experiment"]),
    output:
        report_figure(KEPT_TOKENS_FIGURE),
        f"{WF.results}/figures/{KEPT_TOKENS_FIGURE}.pdf",
    params:
        evit=EVIT,
        weights=WF.weights(config["visualize"]["experiment"]),
        num_images=config["visualize"]["num_images"],
        name=config["visualize"]["experiment"],
        out=lambda w, output: Path(output[1]).with_suffix(""),  # the figure without its .png / .pdf
    localrule: True
    shell:
        "{params.evit} visualize --config {input.config} --checkpoint {params.weights} --name {params.name} "
        "--num-images {params.num_images} --out {params.out}"
