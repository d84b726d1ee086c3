# Published weights (the `downloads:`, e.g. the official DynamicViT-DeiT-S/0.7 checkpoint, and the comparison
# backbones' timm weights), fetched once here on the machine that runs Snakemake, which is online where compute
# nodes often are not; the jobs read them from disk. A .safetensors URL keeps its format (`download_file`).


rule download:
    output:
        RESULTS + "/weights/{name}.{ext}",
    params:
        url=lambda w: WEIGHT_URLS[w.name],
    localrule: True
    run:
        import os
        import urllib.request

        tmp = output[0] + ".part"
        Path(tmp).parent.mkdir(parents=True, exist_ok=True)
        try:
            with urllib.request.urlopen(params.url, timeout=600) as src, open(tmp, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
        except OSError as e:
            raise ValueError(f"download {wildcards.name}: cannot fetch {params.url}: {e}") from None
        os.replace(tmp, output[0])
