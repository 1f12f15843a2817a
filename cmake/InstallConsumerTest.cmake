# Test install_consumer (cmake -P): installs the build tree into a fresh prefix, then configures,
# builds and runs tests/consumer against that prefix alone, as a downstream project would.
# Fails on any broken step: a missing install rule, header or dependency of the package.
#
# Expects -D BUILD_DIR, CONSUMER_DIR, WORK_DIR, GENERATOR, CXX_COMPILER and, optionally,
# LAUNCHER (a compiler launcher such as ccache).
foreach(var BUILD_DIR CONSUMER_DIR WORK_DIR GENERATOR CXX_COMPILER)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "InstallConsumerTest.cmake needs -D${var}=...")
  endif()
endforeach()

set(prefix ${WORK_DIR}/prefix)
set(consumer_build ${WORK_DIR}/build)
file(REMOVE_RECURSE ${WORK_DIR})

execute_process(COMMAND ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix}
                OUTPUT_QUIET COMMAND_ERROR_IS_FATAL ANY)

set(configure_args
  -S ${CONSUMER_DIR} -B ${consumer_build} -G ${GENERATOR}
  -DCMAKE_BUILD_TYPE=Release
  -DCMAKE_CXX_COMPILER=${CXX_COMPILER}
  -DCMAKE_PREFIX_PATH=${prefix}
  # Only the prefix may provide the package, never a registry entry of another build.
  -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
if(LAUNCHER)
  list(APPEND configure_args -DCMAKE_CXX_COMPILER_LAUNCHER=${LAUNCHER})
endif()
execute_process(COMMAND ${CMAKE_COMMAND} ${configure_args} COMMAND_ERROR_IS_FATAL ANY)

# The package must have come from the fresh prefix.
file(STRINGS ${consumer_build}/CMakeCache.txt found_dir REGEX "^modelstate_DIR:")
string(REGEX REPLACE "^[^=]*=" "" found_dir "${found_dir}")
file(REAL_PATH "${found_dir}" found_dir)
file(REAL_PATH "${prefix}" real_prefix)
string(FIND "${found_dir}" "${real_prefix}/" at)
if(NOT at EQUAL 0)
  message(FATAL_ERROR "modelstate was found at ${found_dir}, outside the prefix ${real_prefix}")
endif()

execute_process(COMMAND ${CMAKE_COMMAND} --build ${consumer_build} COMMAND_ERROR_IS_FATAL ANY)

execute_process(COMMAND ${consumer_build}/consumer
                RESULT_VARIABLE exit_code OUTPUT_VARIABLE output ERROR_VARIABLE output
                TIMEOUT 30)
message("${output}")
if(NOT exit_code EQUAL 0 OR NOT output MATCHES "consumer ok")
  message(FATAL_ERROR "the consumer failed (${exit_code})")
endif()

# Keep the build directory small: the prefix holds copies of every binary.
file(REMOVE_RECURSE ${WORK_DIR})
