# The paper's Figure 3: images and the patches kept after each reorganizing block.


rule visualize:
    input:
        config=RUNS + "/" + config["visualize"]["experiment"] + "/config.yaml",
        result=result_file(config["visualize"]["experiment"]),
    output:
        report_figure(KEPT_TOKENS_FIGURE),
        f"{RESULTS}/figures/{KEPT_TOKENS_FIGURE}.pdf",
    params:
        weights=weights(config["visualize"]["experiment"]),
        num_images=config["visualize"]["num_images"],
        name=config["visualize"]["experiment"],
    localrule: True
    shell:
        "{EVIT} visualize --config {input.config} --checkpoint {params.weights} --name {params.name} "
        "--num-images {params.num_images} --out {RESULTS}/figures/" + KEPT_TOKENS_FIGURE
