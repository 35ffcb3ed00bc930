/* SPDX-License-Identifier: GPL-2.0-only WITH Linux-syscall-note */
/*
 * User interface of kvm_userdev_edu, the driver for QEMU's edu PCI device:
 * one misc character device per device, /dev/edu0, /dev/edu1, ..., whose
 * ioctls each run one operation of the device to completion.
 *
 * Every ioctl returns 0 or -1 with errno:
 *   EIO        the device reads all-ones (its emulator is gone)
 *   ETIMEDOUT  the device did not finish in time (5 s per wait)
 *   EINTR      a signal arrived while waiting
 *   ENODEV     the device was unbound from the driver
 *   EINVAL     bad arguments (including non-zero padding)
 *   EFAULT     bad user pointer
 *
 * guest/linux/edu-tool/src/uapi.rs mirrors this file: keep the two in step.
 */
#ifndef _UAPI_KVM_USERDEV_EDU_H
#define _UAPI_KVM_USERDEV_EDU_H

#include <linux/ioctl.h>
#include <linux/types.h>

/* 0xED: free in Documentation/userspace-api/ioctl/ioctl-number.rst. */
#define EDU_IOC_MAGIC 0xED

/* The size of the device's DMA buffer: the largest transfer. */
#define EDU_DMA_BUFFER_SIZE 4096

/* struct edu_info.irq_mode */
#define EDU_IRQ_MODE_INTX 0
#define EDU_IRQ_MODE_MSI 1

/* What the driver knows about the device; reads the identification register. */
struct edu_info {
	__u32 id;		/* out: identification register */
	__u32 irq_mode;		/* out: EDU_IRQ_MODE_* */
	__u32 irq;		/* out: Linux IRQ number */
	__u32 index;		/* out: N of /dev/eduN */
	__u64 irq_count;	/* out: interrupts the handler claimed */
};

/* Writes value to the liveness register and reads it back (~value). */
struct edu_liveness {
	__u32 value;		/* in */
	__u32 result;		/* out */
};

/* struct edu_factorial.flags: wait for the interrupt instead of polling. */
#define EDU_FACTORIAL_IRQ 0x1

/* Computes n! (modulo 2^32) on the device. */
struct edu_factorial {
	__u32 n;		/* in */
	__u32 flags;		/* in: EDU_FACTORIAL_* */
	__u32 result;		/* out */
	__u32 pad;		/* zero */
};

/*
 * Raises the interrupt bits in value (neither 0 nor all-ones) through the
 * raise register and waits until the handler has seen and acknowledged all
 * of them.
 */
struct edu_irq {
	__u32 value;		/* in */
	__u32 seen;		/* out: bits the handler found in the status */
	__u32 status;		/* out: interrupt status after the handler */
	__u32 pad;		/* zero */
};

/* struct edu_dma.flags */
#define EDU_DMA_TO_DEVICE 0x1	/* user memory -> device buffer */
#define EDU_DMA_FROM_DEVICE 0x2	/* device buffer -> user memory */
#define EDU_DMA_IRQ 0x4		/* wait for the interrupt instead of polling */

/*
 * Moves len bytes between user memory at addr and the device buffer at
 * offset, by the device's DMA engine through a kernel bounce buffer. Exactly
 * one direction flag; 0 < len and offset + len <= EDU_DMA_BUFFER_SIZE.
 */
struct edu_dma {
	__u64 addr;		/* in: user address */
	__u32 len;		/* in */
	__u32 offset;		/* in: into the device buffer */
	__u32 flags;		/* in: EDU_DMA_* */
	__u32 pad;		/* zero */
};

#define EDU_IOC_INFO _IOR(EDU_IOC_MAGIC, 0x00, struct edu_info)
#define EDU_IOC_LIVENESS _IOWR(EDU_IOC_MAGIC, 0x01, struct edu_liveness)
#define EDU_IOC_FACTORIAL _IOWR(EDU_IOC_MAGIC, 0x02, struct edu_factorial)
#define EDU_IOC_IRQ _IOWR(EDU_IOC_MAGIC, 0x03, struct edu_irq)
#define EDU_IOC_DMA _IOW(EDU_IOC_MAGIC, 0x04, struct edu_dma)

#endif /* _UAPI_KVM_USERDEV_EDU_H */
