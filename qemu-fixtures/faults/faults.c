// SPDX-License-Identifier: GPL-2.0
/*
 * acpimon_faults: faults for the acpimon test guest (qemu-fixtures/init.sh loads it when the
 * kernel command line says acpimon.fault=...). Debian's kernels have neither LKDTM nor
 * test_lockup, so the test suite brings its own. Loading it breaks the guest on purpose.
 *
 *   fault=softlockup cpu=N   a kthread bound to CPU N spins with preemption disabled
 *                            (interrupts on): the soft-lockup watchdog and RCU report it
 *   fault=hardlockup cpu=N   the same with interrupts disabled too, 2 s after loading (a
 *                            hard LOCKUP report needs the perf NMI watchdog; RCU's stall
 *                            report comes anyway)
 *   fault=hung               a kthread blocks in D state (uninterruptible) forever: the
 *                            hung-task detector reports it
 *
 * The module cannot be unloaded: its threads never return.
 */
#include <linux/completion.h>
#include <linux/cpumask.h>
#include <linux/delay.h>
#include <linux/err.h>
#include <linux/kthread.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/preempt.h>
#include <linux/sched.h>
#include <linux/string.h>

static char *fault = "";
module_param(fault, charp, 0444);
MODULE_PARM_DESC(fault, "softlockup, hardlockup or hung");

static unsigned int cpu = 1;
module_param(cpu, uint, 0444);
MODULE_PARM_DESC(cpu, "the CPU a lockup takes (default 1)");

/* Never completed: whoever waits for it stays in D state. */
static DECLARE_COMPLETION(never);

static noinline int acpimon_soft_lockup(void *unused)
{
	pr_emerg("acpimon_faults: soft-locking CPU %d (preemption off, interrupts on)\n",
		 smp_processor_id());
	preempt_disable();
	for (;;)
		cpu_relax();
	return 0;
}

static noinline int acpimon_hard_lockup(void *unused)
{
	/*
	 * Let modprobe finish first: freeing the module's init memory flushes every CPU's TLB by
	 * IPI, which a CPU with interrupts off never answers (CPU 0 would soft-lock in modprobe).
	 */
	msleep(2000);
	pr_emerg("acpimon_faults: hard-locking CPU %d (interrupts off)\n", smp_processor_id());
	local_irq_disable();
	for (;;)
		cpu_relax();
	return 0;
}

static noinline int acpimon_hung_task(void *unused)
{
	pr_emerg("acpimon_faults: task %s:%d blocks in D state\n", current->comm, current->pid);
	wait_for_completion(&never);
	return 0;
}

static int start_bound(int (*fn)(void *), const char *what)
{
	struct task_struct *t;

	if (cpu >= nr_cpu_ids || !cpu_online(cpu)) {
		pr_err("acpimon_faults: cpu=%u is not online (the guest has %u CPUs)\n", cpu,
		       num_online_cpus());
		return -EINVAL;
	}
	t = kthread_create(fn, NULL, "acpimon-%s/%u", what, cpu);
	if (IS_ERR(t))
		return PTR_ERR(t);
	kthread_bind(t, cpu);
	wake_up_process(t);
	return 0;
}

static int __init acpimon_faults_init(void)
{
	struct task_struct *t;

	if (!strcmp(fault, "softlockup"))
		return start_bound(acpimon_soft_lockup, "soft");
	if (!strcmp(fault, "hardlockup"))
		return start_bound(acpimon_hard_lockup, "hard");
	if (!strcmp(fault, "hung")) {
		t = kthread_run(acpimon_hung_task, NULL, "acpimon-hung");
		return PTR_ERR_OR_ZERO(t);
	}
	pr_err("acpimon_faults: unknown fault='%s' (softlockup, hardlockup or hung)\n", fault);
	return -EINVAL;
}
module_init(acpimon_faults_init);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Faults for the acpimon test guest: lockups and a hung task");
