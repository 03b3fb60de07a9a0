/* dsmoe/moe.h — (being written) */
#ifndef DSMOE_MOE_H
#define DSMOE_MOE_H
#include "router.h"
#endif
