/* dsmoe/balance.h — (being written) */
#ifndef DSMOE_BALANCE_H
#define DSMOE_BALANCE_H
#include "router.h"
#endif
