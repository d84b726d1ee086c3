# Published weights (the `downloads:`, e.g. the official DynamicViT-DeiT-S/0.7 checkpoint, and the comparison
# backbones' timm weights), fetched once here on the machine that runs Snakemake, which is online where compute
# nodes often are not; the jobs read them from disk. A .safetensors URL keeps its format (`WF.download_file`).


rule download:
    output:
        f"{WF.results}/weights/{{name}}.{{ext}}",
    params:
        url=lambda w: WF.weight_urls[w.name],
    localrule: True
    run:
        download(wildcards.name, params.url, output[0])
