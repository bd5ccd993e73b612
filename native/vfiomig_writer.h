/* vfiomig_writer - the fd sink's pipe writer thread (see vfiomig_writer.c). */
#ifndef VFIOMIG_WRITER_H
#define VFIOMIG_WRITER_H

#include <Python.h>

extern PyTypeObject vfm_PipeWriterType;

#endif
