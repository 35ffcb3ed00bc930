// SPDX-License-Identifier: GPL-2.0-only
/*
 * kvm_userdev_edu: a driver for QEMU's edu PCI device (1234:11e8), written
 * from the device's specification (QEMU's docs/specs/edu.rst), so that it
 * drives QEMU's own model and kvm-userdev's emulator alike.
 *
 * Interface: one misc character device per device, /dev/eduN, whose ioctls
 * (kvm_userdev_edu.h) each run one operation of the device to completion,
 * and the attribute /sys/class/misc/eduN/irq_mode ("msi" or "intx").
 *
 * Why ioctls and not sysfs attributes: the operations are request and
 * response (write n, read n!; raise bits, learn what the handler saw; move
 * a buffer and get its bytes). Through sysfs each would be a store and a
 * later show, which another user can slip between, and a DMA buffer is
 * binary data, not a line of text. An ioctl runs the whole operation under
 * the device's lock and reports how it failed as the errno of that very
 * call. The interrupt mode is a plain fact of the device, so it is also an
 * attribute, for scripts.
 *
 * Robustness: every wait for the device is bounded (EDU_TIMEOUT_MS) and
 * fails with -ETIMEDOUT; a device whose registers read all-ones (its
 * emulator died, or it is no longer there) fails operations with -EIO at
 * once rather than waiting for a busy bit that never clears.
 */

#include <linux/bits.h>
#include <linux/dma-mapping.h>
#include <linux/fs.h>
#include <linux/idr.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/io-64-nonatomic-lo-hi.h>
#include <linux/iopoll.h>
#include <linux/kref.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/sysfs.h>
#include <linux/uaccess.h>
#include <linux/wait.h>

#include "kvm_userdev_edu.h"

#define EDU_VENDOR_ID 0x1234
#define EDU_DEVICE_ID 0x11e8

/* BAR0 registers; up to 0x7f 32-bit, the DMA ones also 64-bit */
#define EDU_REG_ID 0x00
#define EDU_REG_LIVENESS 0x04
#define EDU_REG_FACTORIAL 0x08
#define EDU_REG_STATUS 0x20
#define EDU_REG_IRQ_STATUS 0x24
#define EDU_REG_IRQ_RAISE 0x60
#define EDU_REG_IRQ_ACK 0x64
#define EDU_REG_DMA_SRC 0x80
#define EDU_REG_DMA_DST 0x88
#define EDU_REG_DMA_COUNT 0x90
#define EDU_REG_DMA_CMD 0x98

#define EDU_STATUS_COMPUTING BIT(0)
#define EDU_STATUS_IRQ_FACTORIAL BIT(7)

#define EDU_IRQ_FACTORIAL BIT(0)
#define EDU_IRQ_DMA BIT(8)

#define EDU_DMA_START BIT(0)
#define EDU_DMA_TO_RAM BIT(1)
#define EDU_DMA_RAISE_IRQ BIT(2)

/* The DMA buffer, in the device's own address space */
#define EDU_DMA_BUFFER 0x40000
/* The device drops the address bits above these */
#define EDU_DMA_BITS 28

/* What every register of a device that is gone reads */
#define EDU_ALL_ONES 0xffffffffU

/*
 * The bound of every wait for the device: generous, as a nested guest under
 * an emulated CPU on a busy host can take a second for what hardware does
 * in microseconds; a device that is gone is found at once (all-ones).
 */
#define EDU_TIMEOUT_MS 5000
/* Poll intervals: a factorial takes microseconds, QEMU's DMA 100 ms */
#define EDU_FACTORIAL_POLL_US 10
#define EDU_DMA_POLL_US 100

static bool nomsi;
module_param(nomsi, bool, 0444);
MODULE_PARM_DESC(nomsi, "Use INTx even where MSI is available");

static DEFINE_IDA(edu_ida);

struct edu_dev {
	/* One for the PCI binding, one per open file */
	struct kref ref;
	struct pci_dev *pdev;
	void __iomem *regs;
	struct miscdevice misc;
	char name[16];
	int index;
	int irq;
	bool msi;

	/* Serialises the operations; protects gone and dma_buf. */
	struct mutex lock;
	/* Unbound: the mapping, buffer and interrupt are gone. */
	bool gone;
	void *dma_buf;
	dma_addr_t dma_addr;

	/* Protects irq_seen and irq_count. */
	spinlock_t irq_lock;
	/* Status bits the handler acknowledged, not consumed yet */
	u32 irq_seen;
	u64 irq_count;
	wait_queue_head_t irq_wait;
};

static u32 edu_read(struct edu_dev *edu, unsigned int reg)
{
	return readl(edu->regs + reg);
}

static void edu_write(struct edu_dev *edu, unsigned int reg, u32 val)
{
	writel(val, edu->regs + reg);
}

static void edu_write64(struct edu_dev *edu, unsigned int reg, u64 val)
{
	writeq(val, edu->regs + reg);
}

/* A device whose emulator died, or that left the bus, reads all-ones. */
static int edu_check_alive(struct edu_dev *edu)
{
	return edu_read(edu, EDU_REG_ID) == EDU_ALL_ONES ? -EIO : 0;
}

/* Why a bounded wait ended without its event */
static int edu_timeout_error(struct edu_dev *edu)
{
	return edu_check_alive(edu) ?: -ETIMEDOUT;
}

/* Polls reg until its busy bit clears; all-ones ends the wait at once. */
static int edu_poll_idle(struct edu_dev *edu, unsigned int reg, u32 busy,
			 unsigned long sleep_us)
{
	u32 val;
	int ret;

	ret = readl_poll_timeout(edu->regs + reg, val,
				 !(val & busy) || val == EDU_ALL_ONES,
				 sleep_us, EDU_TIMEOUT_MS * USEC_PER_MSEC);
	if (val == EDU_ALL_ONES)
		return -EIO;
	return ret ? edu_timeout_error(edu) : 0;
}

static int edu_wait_factorial(struct edu_dev *edu)
{
	return edu_poll_idle(edu, EDU_REG_STATUS, EDU_STATUS_COMPUTING,
			     EDU_FACTORIAL_POLL_US);
}

static int edu_wait_dma(struct edu_dev *edu)
{
	return edu_poll_idle(edu, EDU_REG_DMA_CMD, EDU_DMA_START,
			     EDU_DMA_POLL_US);
}

static irqreturn_t edu_irq_handler(int irq, void *data)
{
	struct edu_dev *edu = data;
	u32 status = edu_read(edu, EDU_REG_IRQ_STATUS);

	/*
	 * Zero: not ours (INTx may be shared), or an MSI that came after its
	 * bits were acknowledged already. All-ones: the device is gone and
	 * acknowledging would change nothing.
	 */
	if (!status || status == EDU_ALL_ONES)
		return IRQ_NONE;
	edu_write(edu, EDU_REG_IRQ_ACK, status);

	spin_lock(&edu->irq_lock);
	edu->irq_seen |= status;
	edu->irq_count++;
	spin_unlock(&edu->irq_lock);
	wake_up(&edu->irq_wait);
	return IRQ_HANDLED;
}

/* Drops what earlier operations left behind; caller holds edu->lock. */
static void edu_irq_forget(struct edu_dev *edu)
{
	spin_lock_irq(&edu->irq_lock);
	edu->irq_seen = 0;
	spin_unlock_irq(&edu->irq_lock);
}

static bool edu_irq_arrived(struct edu_dev *edu, u32 bits)
{
	bool arrived;

	spin_lock_irq(&edu->irq_lock);
	arrived = (edu->irq_seen & bits) == bits;
	spin_unlock_irq(&edu->irq_lock);
	return arrived;
}

/*
 * Waits until the handler has seen all of bits; returns in *seen (if not
 * NULL) everything it saw, and forgets it.
 */
static int edu_irq_wait(struct edu_dev *edu, u32 bits, u32 *seen)
{
	long left;

	left = wait_event_interruptible_timeout(edu->irq_wait,
						edu_irq_arrived(edu, bits),
						msecs_to_jiffies(EDU_TIMEOUT_MS));
	if (left < 0)
		return -EINTR;
	if (!left)
		return edu_timeout_error(edu);

	spin_lock_irq(&edu->irq_lock);
	if (seen)
		*seen = edu->irq_seen;
	edu->irq_seen = 0;
	spin_unlock_irq(&edu->irq_lock);
	return 0;
}

static void edu_info(struct edu_dev *edu, struct edu_info *info)
{
	info->id = edu_read(edu, EDU_REG_ID);
	info->irq_mode = edu->msi ? EDU_IRQ_MODE_MSI : EDU_IRQ_MODE_INTX;
	info->irq = edu->irq;
	info->index = edu->index;
	spin_lock_irq(&edu->irq_lock);
	info->irq_count = edu->irq_count;
	spin_unlock_irq(&edu->irq_lock);
}

static int edu_liveness(struct edu_dev *edu, struct edu_liveness *l)
{
	edu_write(edu, EDU_REG_LIVENESS, l->value);
	l->result = edu_read(edu, EDU_REG_LIVENESS);
	/* All-ones is the right answer to 0, so ask the ID register. */
	return l->result == EDU_ALL_ONES ? edu_check_alive(edu) : 0;
}

static int edu_factorial(struct edu_dev *edu, struct edu_factorial *f)
{
	bool irq = f->flags & EDU_FACTORIAL_IRQ;
	int ret;

	if ((f->flags & ~EDU_FACTORIAL_IRQ) || f->pad)
		return -EINVAL;
	/* The device ignores n while it computes. */
	ret = edu_wait_factorial(edu);
	if (ret)
		return ret;

	edu_write(edu, EDU_REG_STATUS, irq ? EDU_STATUS_IRQ_FACTORIAL : 0);
	edu_irq_forget(edu);
	edu_write(edu, EDU_REG_FACTORIAL, f->n);
	if (irq) {
		/* The device clears the busy bit before it interrupts. */
		ret = edu_irq_wait(edu, EDU_IRQ_FACTORIAL, NULL);
		edu_write(edu, EDU_REG_STATUS, 0);
	} else {
		ret = edu_wait_factorial(edu);
	}
	if (ret)
		return ret;
	f->result = edu_read(edu, EDU_REG_FACTORIAL);
	return 0;
}

static int edu_raise(struct edu_dev *edu, struct edu_irq *r)
{
	int ret;

	/* The handler takes an all-ones status for a device that is gone. */
	if (!r->value || r->value == EDU_ALL_ONES || r->pad)
		return -EINVAL;

	edu_irq_forget(edu);
	edu_write(edu, EDU_REG_IRQ_RAISE, r->value);
	ret = edu_irq_wait(edu, r->value, &r->seen);
	if (ret) {
		/* Leave no line asserted behind a lost interrupt. */
		edu_write(edu, EDU_REG_IRQ_ACK, r->value);
		return ret;
	}
	r->status = edu_read(edu, EDU_REG_IRQ_STATUS);
	return 0;
}

static int edu_dma(struct edu_dev *edu, struct edu_dma *d)
{
	const u32 dirs = EDU_DMA_TO_DEVICE | EDU_DMA_FROM_DEVICE;
	void __user *ubuf = u64_to_user_ptr(d->addr);
	bool to_device = (d->flags & dirs) == EDU_DMA_TO_DEVICE;
	bool irq = d->flags & EDU_DMA_IRQ;
	u64 cmd = EDU_DMA_START;
	int ret;

	if ((d->flags & ~(dirs | EDU_DMA_IRQ)) || d->pad)
		return -EINVAL;
	if ((d->flags & dirs) != EDU_DMA_TO_DEVICE &&
	    (d->flags & dirs) != EDU_DMA_FROM_DEVICE)
		return -EINVAL;
	/* QEMU's model stops the whole VM on a span outside its buffer. */
	if (!d->len || d->len > EDU_DMA_BUFFER_SIZE ||
	    d->offset > EDU_DMA_BUFFER_SIZE - d->len)
		return -EINVAL;

	/* A transfer that timed out earlier may still be running. */
	ret = edu_wait_dma(edu);
	if (ret)
		return ret;

	if (to_device) {
		if (copy_from_user(edu->dma_buf, ubuf, d->len))
			return -EFAULT;
		edu_write64(edu, EDU_REG_DMA_SRC, edu->dma_addr);
		edu_write64(edu, EDU_REG_DMA_DST, EDU_DMA_BUFFER + d->offset);
	} else {
		/* Bytes the device did not write must not pass for its own. */
		memset(edu->dma_buf, 0, d->len);
		edu_write64(edu, EDU_REG_DMA_SRC, EDU_DMA_BUFFER + d->offset);
		edu_write64(edu, EDU_REG_DMA_DST, edu->dma_addr);
		cmd |= EDU_DMA_TO_RAM;
	}
	edu_write64(edu, EDU_REG_DMA_COUNT, d->len);
	if (irq) {
		cmd |= EDU_DMA_RAISE_IRQ;
		edu_irq_forget(edu);
	}
	/* writeq() orders the buffer's stores before the start. */
	edu_write64(edu, EDU_REG_DMA_CMD, cmd);

	if (irq) {
		ret = edu_irq_wait(edu, EDU_IRQ_DMA, NULL);
		if (ret)
			return ret;
	}
	/*
	 * After the interrupt too: the device clears the start bit before it
	 * interrupts, and the register read orders the buffer's loads after
	 * the transfer.
	 */
	ret = edu_wait_dma(edu);
	if (ret)
		return ret;
	if (!to_device && copy_to_user(ubuf, edu->dma_buf, d->len))
		return -EFAULT;
	return 0;
}

static long edu_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct edu_dev *edu = file->private_data;
	void __user *uarg = (void __user *)arg;
	union {
		struct edu_info info;
		struct edu_liveness liveness;
		struct edu_factorial factorial;
		struct edu_irq irq;
		struct edu_dma dma;
	} u;
	long ret;

	switch (cmd) {
	case EDU_IOC_INFO:
	case EDU_IOC_LIVENESS:
	case EDU_IOC_FACTORIAL:
	case EDU_IOC_IRQ:
	case EDU_IOC_DMA:
		break;
	default:
		return -ENOTTY;
	}

	memset(&u, 0, sizeof(u));
	if ((_IOC_DIR(cmd) & _IOC_WRITE) &&
	    copy_from_user(&u, uarg, _IOC_SIZE(cmd)))
		return -EFAULT;

	if (mutex_lock_interruptible(&edu->lock))
		return -EINTR;
	ret = edu->gone ? -ENODEV : edu_check_alive(edu);
	if (!ret) {
		switch (cmd) {
		case EDU_IOC_INFO:
			edu_info(edu, &u.info);
			break;
		case EDU_IOC_LIVENESS:
			ret = edu_liveness(edu, &u.liveness);
			break;
		case EDU_IOC_FACTORIAL:
			ret = edu_factorial(edu, &u.factorial);
			break;
		case EDU_IOC_IRQ:
			ret = edu_raise(edu, &u.irq);
			break;
		case EDU_IOC_DMA:
			ret = edu_dma(edu, &u.dma);
			break;
		}
	}
	mutex_unlock(&edu->lock);

	if (!ret && (_IOC_DIR(cmd) & _IOC_READ) &&
	    copy_to_user(uarg, &u, _IOC_SIZE(cmd)))
		return -EFAULT;
	return ret;
}

static void edu_free(struct kref *ref)
{
	kfree(container_of(ref, struct edu_dev, ref));
}

static int edu_open(struct inode *inode, struct file *file)
{
	struct edu_dev *edu = container_of(file->private_data,
					   struct edu_dev, misc);

	/*
	 * misc_open() calls this under the lock that misc_deregister() takes,
	 * so the binding's reference is still held here.
	 */
	kref_get(&edu->ref);
	file->private_data = edu;
	return nonseekable_open(inode, file);
}

static int edu_release(struct inode *inode, struct file *file)
{
	struct edu_dev *edu = file->private_data;

	kref_put(&edu->ref, edu_free);
	return 0;
}

static const struct file_operations edu_fops = {
	.owner = THIS_MODULE,
	.open = edu_open,
	.release = edu_release,
	.unlocked_ioctl = edu_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
};

static ssize_t irq_mode_show(struct device *dev, struct device_attribute *attr,
			     char *buf)
{
	struct miscdevice *misc = dev_get_drvdata(dev);
	struct edu_dev *edu = container_of(misc, struct edu_dev, misc);

	return sysfs_emit(buf, "%s\n", edu->msi ? "msi" : "intx");
}
static DEVICE_ATTR_RO(irq_mode);

static struct attribute *edu_attrs[] = {
	&dev_attr_irq_mode.attr,
	NULL
};
ATTRIBUTE_GROUPS(edu);

static int edu_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct device *dev = &pdev->dev;
	struct edu_dev *edu;
	u32 ident;
	int ret;

	ret = pcim_enable_device(pdev);
	if (ret)
		return ret;

	edu = kzalloc(sizeof(*edu), GFP_KERNEL);
	if (!edu)
		return -ENOMEM;
	kref_init(&edu->ref);
	mutex_init(&edu->lock);
	spin_lock_init(&edu->irq_lock);
	init_waitqueue_head(&edu->irq_wait);
	edu->pdev = pdev;

	/* The mapping, DMA buffer and vectors are released after remove. */
	edu->regs = pcim_iomap_region(pdev, 0, KBUILD_MODNAME);
	if (IS_ERR(edu->regs)) {
		ret = PTR_ERR(edu->regs);
		goto err_put;
	}
	ident = edu_read(edu, EDU_REG_ID);
	if (ident == EDU_ALL_ONES) {
		dev_err(dev, "device reads all-ones\n");
		ret = -ENODEV;
		goto err_put;
	}

	ret = dma_set_mask_and_coherent(dev, DMA_BIT_MASK(EDU_DMA_BITS));
	if (ret) {
		dev_err(dev, "no %d-bit DMA\n", EDU_DMA_BITS);
		goto err_put;
	}
	edu->dma_buf = dmam_alloc_coherent(dev, EDU_DMA_BUFFER_SIZE,
					   &edu->dma_addr, GFP_KERNEL);
	if (!edu->dma_buf) {
		ret = -ENOMEM;
		goto err_put;
	}
	pci_set_master(pdev);

	ret = pci_alloc_irq_vectors(pdev, 1, 1, nomsi ? PCI_IRQ_INTX :
				    PCI_IRQ_MSI | PCI_IRQ_INTX);
	if (ret < 0)
		goto err_put;
	edu->msi = pdev->msi_enabled;
	edu->irq = pci_irq_vector(pdev, 0);

	/* Start clean: no factorial interrupt, nothing pending. */
	edu_write(edu, EDU_REG_STATUS, 0);
	edu_write(edu, EDU_REG_IRQ_ACK, EDU_ALL_ONES);

	edu->index = ida_alloc(&edu_ida, GFP_KERNEL);
	if (edu->index < 0) {
		ret = edu->index;
		goto err_put;
	}
	snprintf(edu->name, sizeof(edu->name), "edu%d", edu->index);

	ret = request_irq(edu->irq, edu_irq_handler,
			  edu->msi ? 0 : IRQF_SHARED, edu->name, edu);
	if (ret)
		goto err_ida;

	edu->misc.minor = MISC_DYNAMIC_MINOR;
	edu->misc.name = edu->name;
	edu->misc.fops = &edu_fops;
	edu->misc.parent = dev;
	edu->misc.groups = edu_groups;
	pci_set_drvdata(pdev, edu);
	ret = misc_register(&edu->misc);
	if (ret)
		goto err_irq;

	dev_info(dev, "/dev/%s: id %#010x, %s interrupt %d, DMA buffer at %pad\n",
		 edu->name, ident, edu->msi ? "MSI" : "INTx", edu->irq,
		 &edu->dma_addr);
	return 0;

err_irq:
	free_irq(edu->irq, edu);
err_ida:
	ida_free(&edu_ida, edu->index);
err_put:
	kref_put(&edu->ref, edu_free);
	return ret;
}

static void edu_remove(struct pci_dev *pdev)
{
	struct edu_dev *edu = pci_get_drvdata(pdev);

	/* No new opens; files still open get -ENODEV from here on. */
	misc_deregister(&edu->misc);
	mutex_lock(&edu->lock);
	edu->gone = true;
	mutex_unlock(&edu->lock);

	/* A shared INTx line must not stay asserted once the handler is gone. */
	edu_write(edu, EDU_REG_STATUS, 0);
	edu_write(edu, EDU_REG_IRQ_ACK, EDU_ALL_ONES);
	free_irq(edu->irq, edu);
	/* A transfer that timed out must not land in the freed buffer. */
	pci_clear_master(pdev);
	ida_free(&edu_ida, edu->index);
	kref_put(&edu->ref, edu_free);
}

static const struct pci_device_id edu_ids[] = {
	{ PCI_DEVICE(EDU_VENDOR_ID, EDU_DEVICE_ID) },
	{ }
};
MODULE_DEVICE_TABLE(pci, edu_ids);

static struct pci_driver edu_driver = {
	.name = KBUILD_MODNAME,
	.id_table = edu_ids,
	.probe = edu_probe,
	.remove = edu_remove,
};
module_pci_driver(edu_driver);

MODULE_DESCRIPTION("Driver for QEMU's edu PCI device");
MODULE_LICENSE("GPL");
