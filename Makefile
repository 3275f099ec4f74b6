# ds4 build. `make` builds the engine library, every program and every test.
# Layout is discovered, not listed: a new src/<concern>/*.c joins the library,
# a new apps/<prog>/ or tools/<prog>/ directory becomes build/bin/<prog>,
# a new tests/test_*.c becomes build/tests/test_*.
#
#   make            library + programs + tests (CUDA backend too when nvcc is found)
#   make test       build, then run the whole suite (tests/run.sh)
#   make quickstart install missing deps, build, run a one-shot prompt
#   make fuzz       build the libFuzzer harnesses (clang)
#   CUDA=0          force a CPU-only build;  CUDA_ARCH=sm_90 picks the GPU target

CC      ?= cc
CFLAGS  ?= -O2 -g
CFLAGS  += -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wno-unused-parameter -Isrc -MMD -MP -pthread
CFLAGS  += -march=x86-64-v3
LDLIBS  += -lm -lpthread -lcjson -lutf8proc -lmicrohttpd -ledit -lcrypto
BUILD   := build

NVCC      ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CUDA      ?= $(if $(NVCC),1,0)
CUDA_ARCH ?= sm_90
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))

LIB_SRCS  := $(wildcard src/*/*.c)
LIB_OBJS  := $(LIB_SRCS:%.c=$(BUILD)/%.o)
ifeq ($(CUDA),1)
CU_SRCS   := $(wildcard src/cuda/*.cu)
CU_OBJS   := $(CU_SRCS:%.cu=$(BUILD)/%.o)
CFLAGS    += -DDS4_CUDA=1
# cudart linked statically: binaries then need only the driver (libcuda) on
# the GPU machine, whatever toolkit it has installed.
LDLIBS    += -L$(CUDA_HOME)/lib64 -lcudart_static -ldl -lrt
# sm_90 SASS plus compute_90 PTX so later GPUs JIT the same code.
NVFLAGS   ?= -O3 -std=c++17 -Isrc -Xcompiler -Wall,-Wextra,-Wno-unused-parameter \
             -gencode arch=compute_$(subst sm_,,$(CUDA_ARCH)),code=[$(CUDA_ARCH),compute_$(subst sm_,,$(CUDA_ARCH))] \
             -lineinfo -MMD -MP
endif

PROG_DIRS := $(wildcard apps/*/ tools/ds4-*/)
PROGS     := $(foreach d,$(PROG_DIRS),$(BUILD)/bin/$(notdir $(patsubst %/,%,$(d))))
TEST_SRCS := $(wildcard tests/test_*.c)
TESTS     := $(TEST_SRCS:tests/%.c=$(BUILD)/tests/%)
LIB       := $(BUILD)/libds4.a

.PHONY: all test quickstart fuzz clean deps
all: $(LIB) $(PROGS) $(TESTS)

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/%.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -c $< -o $@

$(LIB): $(LIB_OBJS) $(CU_OBJS)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

# One program per directory: every .c file in it, linked against the library.
define prog_rule
$(BUILD)/bin/$(notdir $(patsubst %/,%,$(1))): $(patsubst %.c,$(BUILD)/%.o,$(wildcard $(1)*.c)) $(LIB)
	@mkdir -p $$(dir $$@)
	$$(CC) $$(CFLAGS) $$^ -o $$@ $$(LDLIBS) $(if $(CU_OBJS),-lstdc++)
endef
$(foreach d,$(PROG_DIRS),$(eval $(call prog_rule,$(d))))

$(BUILD)/tests/%: tests/%.c $(LIB) tests/test.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests $< $(LIB) -o $@ $(LDLIBS) $(if $(CU_OBJS),-lstdc++)

deps:
	./scripts/deps.sh

test: deps all
	./tests/run.sh

quickstart: deps all
	./scripts/quickstart.sh

# libFuzzer harnesses: tests/fuzz/fuzz_*.c become build/fuzz/fuzz_* (run by
# tests/fuzz.sh). The library is rebuilt under clang with coverage, ASan and
# UBSan into its own archive, object by object (so rebuilds are incremental),
# and each harness links only the objects it actually uses.
FUZZ_SRCS   := $(wildcard tests/fuzz/fuzz_*.c)
FUZZ_BINS   := $(FUZZ_SRCS:tests/fuzz/%.c=$(BUILD)/fuzz/%)
FUZZ_OBJS   := $(LIB_SRCS:%.c=$(BUILD)/fuzz/obj/%.o)
FUZZ_LIB    := $(BUILD)/fuzz/libds4-fuzz.a
FUZZ_SAN    := address,undefined
FUZZ_CFLAGS := -std=c11 -D_GNU_SOURCE -g -O1 -Wall -Wextra -Wno-unused-parameter -Isrc -pthread -fno-sanitize-recover=undefined -MMD -MP
fuzz: $(FUZZ_BINS)
$(BUILD)/fuzz/obj/%.o: %.c
	@mkdir -p $(dir $@)
	clang $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link,$(FUZZ_SAN) -c $< -o $@
$(FUZZ_LIB): $(FUZZ_OBJS)
	rm -f $@ && ar rcs $@ $^
$(FUZZ_BINS): $(BUILD)/fuzz/%: tests/fuzz/%.c $(FUZZ_LIB)
	clang $(FUZZ_CFLAGS) -fsanitize=fuzzer,$(FUZZ_SAN) $< $(filter %.o,$^) $(FUZZ_LIB) -o $@ $(LDLIBS)
# A harness of a tool's own parser also links that tool's source.
$(BUILD)/fuzz/fuzz_safetensors: $(BUILD)/fuzz/obj/tools/ds4-convert/safetensors.o

clean:
	rm -rf $(BUILD)

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
