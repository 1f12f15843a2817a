// What a same-host export promises every reader: the daemon hands out memfds
// sealed with these, and a client refuses a descriptor that lacks any of them.
#ifndef MODELSTATE_TRANSFER_EXPORT_SEALS_H_
#define MODELSTATE_TRANSFER_EXPORT_SEALS_H_

#include <fcntl.h>

namespace modelstate {

// Nothing can write, resize or unseal an export.
inline constexpr int kExportSeals =
    F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE;

}  // namespace modelstate

#endif  // MODELSTATE_TRANSFER_EXPORT_SEALS_H_
