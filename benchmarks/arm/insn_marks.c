/* A QEMU TCG plugin: counts the guest instructions executed (all vCPUs, i.e. all threads) and
 * writes the running total to a file each time the guest makes the otherwise unused system call
 * MARK_SYSCALL (its first argument is a tag), so a program can count a region of its own, e.g.
 * "instructions per decoded token", as the difference of two marks.
 *
 *   qemu-aarch64 -plugin ./libinsn_marks.so,out=marks.txt ...    (guest: syscall(0x7e57, tag))
 *
 * Built against qemu's own include/qemu/qemu-plugin.h (check.sh builds both). */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define MARK_SYSCALL 0x7e57

static struct qemu_plugin_scoreboard *counts;
static qemu_plugin_u64 insns;
static FILE *out;

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    qemu_plugin_register_vcpu_tb_exec_inline_per_vcpu(
        tb, QEMU_PLUGIN_INLINE_ADD_U64, insns, qemu_plugin_tb_n_insns(tb));
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1,
                       uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6,
                       uint64_t a7, uint64_t a8)
{
    if (num == MARK_SYSCALL) {
        fprintf(out, "%" PRIu64 " %" PRIu64 "\n", a1, qemu_plugin_u64_sum(insns));
        fflush(out);
    }
}

static void on_guest_exit(qemu_plugin_id_t id, void *data)
{
    fprintf(out, "exit %" PRIu64 "\n", qemu_plugin_u64_sum(insns));
    fclose(out);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    out = stderr;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0 && !(out = fopen(argv[i] + 4, "w"))) {
            perror(argv[i] + 4);
            return -1;
        }
    }
    counts = qemu_plugin_scoreboard_new(sizeof(uint64_t));
    insns = qemu_plugin_scoreboard_u64(counts);
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, on_guest_exit, NULL);
    return 0;
}
