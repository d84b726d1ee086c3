# Before any cluster job, the local job `evit check` (evit/check.py) checks what the dry run cannot without torch:
# the datasets' layouts as the loaders read them, each distinct model built once on the meta device (its arch, its
# method's block indices against its depth), each trained run's augment (train.aa, parsed by timm), the weights
# files no job makes (mapped checkpoints, init files) against their models, and every box file of the masking
# experiment with the share its boxes leave masked. Every cluster rule takes its stamp as an ancient input: an
# edited config reruns the check, not the finished runs.


rule check:
    output:
        WF.check_stamp,
    params:
        checks=lambda w: WF.check_config(),
        file=f"{WF.results}/checks/config.yaml",
        evit=EVIT,
    localrule: True
    run:
        write_yaml(params.file, params.checks)
        shell("{params.evit} check --config {params.file} --out {output}")
